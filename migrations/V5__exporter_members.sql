-- Exporters sharing series by membership (`sharding: members`): each one heartbeats its row;
-- the rows seen recently are the live members, and a series belongs to the member with the
-- highest rendezvous hash. A stopping exporter deletes its row so the others take over at once.
CREATE TABLE exporter_members (
    member    TEXT        PRIMARY KEY,
    heartbeat TIMESTAMPTZ NOT NULL DEFAULT now()
);
