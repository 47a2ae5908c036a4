-- Tags on documents and parameters (SSM's Document and Parameter tagging), a JSON object each, as
-- nodes keep their listing copy. Nothing selects by them in SQL (a listing filters the page).
ALTER TABLE documents ADD COLUMN tags TEXT NOT NULL DEFAULT '{}';
ALTER TABLE params ADD COLUMN tags TEXT NOT NULL DEFAULT '{}';
