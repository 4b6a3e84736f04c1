-- Catalogue changes made at run time (PUT/DELETE /admin/v1/models/{id}),
-- replayed over the catalogue file at start-up, latest per model wins.
-- `spec` is the model as its PUT body spelled it; NULL marks a deletion.
CREATE TABLE catalog_edits (
    model_id TEXT PRIMARY KEY,
    spec TEXT,
    edited_at BIGINT NOT NULL
);
