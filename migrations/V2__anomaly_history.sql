-- Anomaly episodes recorded by `mad serve`: one row per series per episode. Rows are upserted on
-- (detector, series, started_at), so a write replayed after an outage changes nothing twice.
CREATE TABLE anomaly_episodes (
    id          BIGSERIAL PRIMARY KEY,
    detector    TEXT             NOT NULL,
    series      TEXT             NOT NULL,  -- canonical label set, as in model metadata
    labels      JSONB            NOT NULL,
    started_at  TIMESTAMPTZ      NOT NULL,
    ended_at    TIMESTAMPTZ,                -- NULL while the episode is open
    peak_score  DOUBLE PRECISION NOT NULL,
    drivers     JSONB,                      -- multivariate detectors: the inputs that drove it
    UNIQUE (detector, series, started_at)
);

CREATE INDEX anomaly_episodes_by_time ON anomaly_episodes (detector, started_at DESC);
CREATE INDEX anomaly_episodes_by_labels ON anomaly_episodes USING GIN (labels);
