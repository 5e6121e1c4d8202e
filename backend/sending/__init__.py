"""Sending from the CRM (R15): compose, file at once, send through the user's own mailbox
in a job, never twice."""
