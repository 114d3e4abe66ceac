-- The first schema: users (auth), conversations and messages (chat),
-- attachments and document_chunks (ingest writes, rag reads).
--
-- document_chunks keeps the quoted camelCase column names of the system the
-- runbook was written for ("attachmentId"), so its SQL runs as written. The
-- embedding dimension is fixed here, from configuration, when the table is
-- made; services refuse to start against a table of another dimension.

CREATE EXTENSION IF NOT EXISTS vector;

-- Slow-query statistics for the runbook; not every server ships the module.
DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'pg_stat_statements not available: %', SQLERRM;
END
$$;

CREATE TABLE users (
    id           text PRIMARY KEY,
    email        text NOT NULL DEFAULT '',
    groups       text[] NOT NULL DEFAULT '{}',
    disabled     boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE conversations (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    text NOT NULL,
    title      text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX conversations_user_updated_idx
    ON conversations (user_id, updated_at DESC, id);

CREATE TABLE messages (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role            text NOT NULL CHECK (role IN ('user', 'assistant')),
    content         text NOT NULL,
    status          text NOT NULL DEFAULT 'complete'
                    CHECK (status IN ('complete', 'stopped', 'error')),
    provider        text NOT NULL DEFAULT '',
    model           text NOT NULL DEFAULT '',
    citations       jsonb NOT NULL DEFAULT '[]',
    input_tokens    integer NOT NULL DEFAULT 0,
    output_tokens   integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX messages_conversation_created_idx
    ON messages (conversation_id, created_at);

CREATE TABLE attachments (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id         text NOT NULL,
    conversation_id uuid,
    filename        text NOT NULL,
    content_type    text NOT NULL,
    size_bytes      bigint NOT NULL CHECK (size_bytes >= 0),
    s3_key          text NOT NULL,
    status          text NOT NULL DEFAULT 'uploading'
                    CHECK (status IN ('uploading', 'processing', 'ready', 'error')),
    error           text NOT NULL DEFAULT '',
    content_hash    text,
    chunk_count     integer NOT NULL DEFAULT 0,
    page_count      integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX attachments_user_created_idx ON attachments (user_id, created_at DESC);
CREATE INDEX attachments_user_hash_idx ON attachments (user_id, content_hash);

CREATE TABLE document_chunks (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    "attachmentId" uuid NOT NULL REFERENCES attachments (id) ON DELETE CASCADE,
    "userId"       text NOT NULL,
    filename       text NOT NULL,
    "chunkIndex"   integer NOT NULL,
    "pageNumber"   integer,
    content        text NOT NULL,
    embedding      vector({{EMBEDDING_DIM}}) NOT NULL,
    "createdAt"    timestamptz NOT NULL DEFAULT now(),
    UNIQUE ("attachmentId", "chunkIndex")
);
CREATE INDEX document_chunks_user_idx ON document_chunks ("userId");
CREATE INDEX document_chunks_embedding_idx
    ON document_chunks USING hnsw (embedding vector_cosine_ops);
