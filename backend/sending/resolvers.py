"""sendEmail: thin; the sending service decides, the unit of work commits and queues."""

import strawberry

from backend.graphql.context import Info
from backend.graphql.errors import UserError, attempt, require_viewer, user_errors
from backend.graphql.inputs import optional_id, required_id
from backend.kit.errors import ServiceError
from backend.mail.tables import Email as EmailRow
from backend.sending import service
from backend.timeline.types import Email


@strawberry.input(description="An email written in the CRM, sent through the user's own mailbox.")
class SendEmailInput:
    mailbox_id: strawberry.ID
    to: list[str]
    cc: list[str] | None = None
    bcc: list[str] | None = None
    subject: str
    body_text: str | None = None
    body_html: str | None = None
    in_reply_to_email_id: strawberry.ID | None = strawberry.field(
        default=None, description="reply inside an existing thread"
    )
    idempotency_key: str | None = strawberry.field(
        default=None,
        description="the same key never sends twice: sending again with it returns the first email",
    )


@strawberry.type
class SendEmailPayload:
    email: Email | None
    user_errors: list[UserError]


@strawberry.type
class SendMutation:
    @strawberry.mutation(
        description="File the email on its To/Cc contacts at once (deliveryStatus QUEUED) and "
        "send it through the mailbox; emailDeliveryChanged tells when it is SENT or FAILED."
    )
    async def send_email(self, info: Info, input: SendEmailInput) -> SendEmailPayload:
        viewer = require_viewer(info)
        scope = info.context.scope

        async def send() -> object:
            request = service.SendRequest(
                mailbox_id=required_id(input.mailbox_id, "Mailbox", ["mailboxId"]),
                to=input.to,
                cc=input.cc or [],
                bcc=input.bcc or [],
                subject=input.subject,
                body_text=input.body_text,
                body_html=input.body_html,
                in_reply_to_email_id=optional_id(
                    input.in_reply_to_email_id, "Email", ["inReplyToEmailId"]
                ),
                idempotency_key=input.idempotency_key,
            )
            return await service.queue_email(scope.session, scope.effects, viewer, request)

        result = await attempt(info, send)
        if isinstance(result, ServiceError):
            return SendEmailPayload(email=None, user_errors=user_errors(result, ["input"]))
        assert isinstance(result, EmailRow)
        return SendEmailPayload(email=Email(row=result), user_errors=[])
