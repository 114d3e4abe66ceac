-- Documents: what the ingest worker records about each attachment's processing.
--
-- attempts counts the deliveries of the attachment's queue message, so that
-- an operator sees how close a failing job is to the dead-letter queue.
-- reused_from names the attachment whose chunks were copied because the
-- same user uploaded the same bytes before (same content_hash), in which
-- case the file was neither parsed nor embedded again.

ALTER TABLE attachments
    ADD COLUMN attempts    integer NOT NULL DEFAULT 0,
    ADD COLUMN reused_from uuid REFERENCES attachments (id) ON DELETE SET NULL;

-- Content-hash reuse looks for a ready attachment of the same user with the
-- same bytes; the (user_id, content_hash) index of 0001 serves it.

-- Retrieval's exact path reads one user's chunks of ready attachments; the
-- per-user index of 0001 finds them, this one lets a search restricted to a
-- few attachments skip the rest.
CREATE INDEX document_chunks_user_attachment_idx
    ON document_chunks ("userId", "attachmentId");
