"""The entry layer of the API process: the schema assembled from every domain, its
subscriptions, and the plain HTTP routes beside GraphQL."""
