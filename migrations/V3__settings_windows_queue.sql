-- Detectors defined through the management API (the config file's detectors win on a name clash,
-- and the API refuses to shadow them). `spec` holds the same keys as a detector in the config file.
CREATE TABLE detectors (
    name       TEXT        PRIMARY KEY,
    spec       JSONB       NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Maintenance (exclusion) windows: their data is left out of training and no episode is recorded
-- inside them. `detector` NULL means every detector; `matchers` are exact label matches that a
-- series must all have (empty: every series).
CREATE TABLE maintenance_windows (
    id         BIGSERIAL   PRIMARY KEY,
    starts_at  TIMESTAMPTZ NOT NULL,
    ends_at    TIMESTAMPTZ NOT NULL,
    detector   TEXT,
    matchers   JSONB       NOT NULL DEFAULT '{}'::jsonb,
    reason     TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at)
);
CREATE INDEX maintenance_windows_by_time ON maintenance_windows (ends_at, starts_at);

-- Retraining requests, taken by `mad train --watch` with FOR UPDATE SKIP LOCKED so that several
-- trainers never take the same one.
CREATE TABLE training_requests (
    id           BIGSERIAL   PRIMARY KEY,
    detector     TEXT        NOT NULL,
    status       TEXT        NOT NULL DEFAULT 'queued'
                 CHECK (status IN ('queued', 'running', 'done', 'failed')),
    requested_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at   TIMESTAMPTZ,
    finished_at  TIMESTAMPTZ,
    trainer      TEXT,
    version      TEXT,
    error        TEXT
);
CREATE INDEX training_requests_queued ON training_requests (requested_at) WHERE status = 'queued';
