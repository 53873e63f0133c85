-- The relay's durable state when it shares the PostgreSQL database (`store.postgres`): the same
-- things the embedded redb file holds. An intake request is one transaction over relay_alerts and
-- relay_outbox; a message row is deleted only once Telegram has taken it.

-- What each alert (by its label-set key) last said, and the Telegram message that announced its
-- current firing, which the resolution replies to.
CREATE TABLE relay_alerts (
    key          TEXT    PRIMARY KEY,
    firing       BOOLEAN NOT NULL,
    notified_at  BIGINT  NOT NULL,
    message_chat BIGINT,
    message_id   INTEGER
);

-- Messages still to send, oldest first per chat.
CREATE TABLE relay_outbox (
    id        BIGSERIAL PRIMARY KEY,
    chat      BIGINT    NOT NULL,
    kind      TEXT      NOT NULL CHECK (kind IN ('firing', 'reminder', 'resolved')),
    alerts    JSONB     NOT NULL,
    queued_at BIGINT    NOT NULL
);

-- Messages Telegram kept refusing, kept for inspection.
CREATE TABLE relay_dead_letters (
    id        BIGINT      PRIMARY KEY,
    chat      BIGINT      NOT NULL,
    kind      TEXT        NOT NULL,
    alerts    JSONB       NOT NULL,
    queued_at BIGINT      NOT NULL,
    died_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Alerts of each firing message Telegram took: its buttons act on them.
CREATE TABLE relay_sent (
    chat       BIGINT  NOT NULL,
    message_id INTEGER NOT NULL,
    alerts     JSONB   NOT NULL,
    PRIMARY KEY (chat, message_id)
);

-- Silences set from the chat: every matcher must equal the alert's label.
CREATE TABLE relay_silences (
    id         BIGSERIAL PRIMARY KEY,
    matchers   JSONB     NOT NULL,
    ends_at    BIGINT    NOT NULL,
    created_by TEXT      NOT NULL,
    created_at BIGINT    NOT NULL
);
CREATE INDEX relay_silences_by_end ON relay_silences (ends_at);

-- Small counters (the next Telegram update to read).
CREATE TABLE relay_meta (
    key   TEXT   PRIMARY KEY,
    value BIGINT NOT NULL
);
