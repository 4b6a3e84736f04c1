-- OpenAI's `user` of the request, for billing consumers.
ALTER TABLE usage_records ADD COLUMN end_user TEXT NOT NULL DEFAULT '';
