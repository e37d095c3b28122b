-- 005_processor_events.sql - paycoord 0.2: processor webhooks (Stripe events,
-- Adyen notifications), kept so that each is handled once and survives a
-- restart. The webhook listener writes an event durably before it answers
-- the processor, deduplicated on event_id; the adapter then finds it when it
-- next asks about the payment. A webhook never settles a payment by itself.
--
-- event_id:      Stripe's evt_ id; Adyen's pspReference:eventCode:success.
-- gid:           our gid (Stripe metadata gid, Adyen merchantReference).
-- processor_ref: the payment's id at the processor (pi_..., pspReference of
--                the payment; for a modification its originalReference).
-- status:        what the event says the payment is (succeeded, declined,
--                pending, canceled), or 'none' (e.g. a failed cancel).

CREATE TABLE processor_events (
    event_id        text PRIMARY KEY CHECK (length(event_id) BETWEEN 1 AND 159),
    processor       text NOT NULL CHECK (processor IN ('stripe', 'adyen')),
    gid             text CHECK (length(gid) < 208),
    processor_ref   text CHECK (length(processor_ref) < 128),
    kind            text NOT NULL CHECK (length(kind) < 64),
    status          text NOT NULL CHECK (status IN ('succeeded', 'declined', 'pending', 'canceled', 'none')),
    success         boolean NOT NULL,
    is_cancel       boolean NOT NULL DEFAULT false,
    reason          text CHECK (length(reason) < 128),
    amount          bigint,
    currency        text,
    received_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX processor_events_gid ON processor_events (gid, received_at);
