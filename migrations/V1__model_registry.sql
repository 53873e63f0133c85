-- Model registry: every trained version of every detector, one active per detector.
CREATE TABLE models (
    id          BIGSERIAL PRIMARY KEY,
    detector    TEXT        NOT NULL,
    version     TEXT        NOT NULL,
    onnx        BYTEA       NOT NULL,
    meta        JSONB       NOT NULL,
    size_bytes  BIGINT      NOT NULL,
    trained_at  TIMESTAMPTZ NOT NULL,
    train_start TIMESTAMPTZ NOT NULL,
    train_end   TIMESTAMPTZ NOT NULL,
    active      BOOLEAN     NOT NULL DEFAULT FALSE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (detector, version)
);

-- At most one active version per detector, enforced by the database itself.
CREATE UNIQUE INDEX models_one_active ON models (detector) WHERE active;
CREATE INDEX models_by_detector ON models (detector, version DESC);
