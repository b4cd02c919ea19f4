-- Billing domain: organizations, plans and prices, subscriptions, invoices, payments,
-- charges and alerts. Money is bigint micros of the currency (1 USD = 1,000,000).

CREATE TABLE shared.organizations (
  org_id uuid PRIMARY KEY,
  name text NOT NULL,
  industry text NOT NULL CHECK (industry IN ('hs', 'rest', 'auto', 'ret', 'edu', 'payroll')),
  created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE shared.subscription_plans (
  plan_id text PRIMARY KEY,
  name text NOT NULL,
  base_price_micros bigint NOT NULL CHECK (base_price_micros >= 0),
  currency text NOT NULL DEFAULT 'usd',
  billing_interval interval NOT NULL DEFAULT interval '1 month',
  active boolean NOT NULL DEFAULT true
);

-- Plan x meter: a new meter or a negotiated plan is a row, not a release.
CREATE TABLE shared.plan_prices (
  plan_id text NOT NULL REFERENCES shared.subscription_plans (plan_id),
  meter text NOT NULL REFERENCES shared.meters (name),
  included_quantity bigint NOT NULL DEFAULT 0 CHECK (included_quantity >= 0),
  unit_price_micros bigint NOT NULL CHECK (unit_price_micros >= 0),
  PRIMARY KEY (plan_id, meter)
);

INSERT INTO shared.subscription_plans (plan_id, name, base_price_micros) VALUES
  ('basic', 'Basic', 50000000),
  ('pro', 'Pro', 150000000),
  ('enterprise', 'Enterprise', 500000000);
INSERT INTO shared.plan_prices (plan_id, meter, included_quantity, unit_price_micros)
SELECT p.plan_id, m.meter, CASE WHEN m.meter = 'api_calls' THEN p.included ELSE 0 END, m.price
FROM (VALUES ('basic', 1000), ('pro', 5000), ('enterprise', 20000)) AS p (plan_id, included)
CROSS JOIN (VALUES ('api_calls', 10000), ('data_exports', 100000), ('ai_requests', 50000))
  AS m (meter, price);

CREATE TABLE shared.stripe_customers (
  org_id uuid PRIMARY KEY REFERENCES shared.organizations (org_id),
  stripe_customer_id text NOT NULL UNIQUE,
  email text,
  created_at timestamptz NOT NULL DEFAULT now()
);

-- Status: active | trialing | past_due (billed), canceled (billed for its last period, then
-- ended), ended (never billed again).
CREATE TABLE shared.subscriptions (
  subscription_id bigserial PRIMARY KEY,
  org_id uuid NOT NULL REFERENCES shared.organizations (org_id),
  plan_id text NOT NULL REFERENCES shared.subscription_plans (plan_id),
  status text NOT NULL DEFAULT 'active'
    CHECK (status IN ('active', 'trialing', 'past_due', 'canceled', 'ended')),
  current_period_start timestamptz NOT NULL,
  current_period_end timestamptz NOT NULL,
  canceled_at timestamptz,
  stripe_subscription_id text UNIQUE,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  CHECK (current_period_end > current_period_start)
);
CREATE UNIQUE INDEX subscriptions_one_live_per_org ON shared.subscriptions (org_id)
  WHERE status <> 'ended';
CREATE INDEX subscriptions_due_idx ON shared.subscriptions (current_period_end)
  WHERE status <> 'ended';

-- Opt-in per-request log (track_api_request); never written by the Kafka hot path.
CREATE TABLE shared.api_usage_logs (
  log_id bigserial PRIMARY KEY,
  org_id uuid NOT NULL,
  meter text NOT NULL REFERENCES shared.meters (name),
  industry text NOT NULL,
  endpoint text,
  method text,
  status_code integer,
  response_ms integer,
  quantity bigint NOT NULL DEFAULT 1,
  occurred_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_usage_logs_org_idx ON shared.api_usage_logs (org_id, occurred_at);

CREATE TABLE shared.payment_methods (
  payment_method_id bigserial PRIMARY KEY,
  org_id uuid NOT NULL REFERENCES shared.organizations (org_id),
  stripe_payment_method_id text NOT NULL UNIQUE,
  brand text,
  last4 text,
  exp_month integer,
  exp_year integer,
  is_default boolean NOT NULL DEFAULT false,
  created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE shared.invoices (
  invoice_id bigserial PRIMARY KEY,
  org_id uuid NOT NULL,
  subscription_id bigint NOT NULL REFERENCES shared.subscriptions (subscription_id),
  plan_id text NOT NULL REFERENCES shared.subscription_plans (plan_id),
  period_start timestamptz NOT NULL,
  period_end timestamptz NOT NULL,
  currency text NOT NULL DEFAULT 'usd',
  status text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'paid', 'void', 'uncollectible')),
  total_micros bigint NOT NULL DEFAULT 0,
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (subscription_id, period_start)
);
CREATE INDEX invoices_org_idx ON shared.invoices (org_id, period_start);

-- kind: base_fee | usage (one per plan meter, also at zero) | adjustment (late usage for an
-- earlier, already invoiced period; usage_period_* name that period).
CREATE TABLE shared.invoice_lines (
  line_id bigserial PRIMARY KEY,
  invoice_id bigint NOT NULL REFERENCES shared.invoices (invoice_id),
  org_id uuid NOT NULL,
  kind text NOT NULL CHECK (kind IN ('base_fee', 'usage', 'adjustment')),
  meter text REFERENCES shared.meters (name),
  usage_period_start date,
  usage_period_end date,
  quantity bigint NOT NULL DEFAULT 0,
  included_quantity bigint NOT NULL DEFAULT 0,
  billable_quantity bigint NOT NULL DEFAULT 0,
  unit_price_micros bigint NOT NULL DEFAULT 0,
  amount_micros bigint NOT NULL,
  description text NOT NULL
);
CREATE INDEX invoice_lines_invoice_idx ON shared.invoice_lines (invoice_id);
CREATE INDEX invoice_lines_org_period_idx ON shared.invoice_lines (org_id, usage_period_start);

CREATE TABLE shared.payments (
  payment_id bigserial PRIMARY KEY,
  org_id uuid NOT NULL,
  invoice_id bigint REFERENCES shared.invoices (invoice_id),
  amount_micros bigint NOT NULL,
  currency text NOT NULL DEFAULT 'usd',
  status text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed', 'refunded')),
  stripe_payment_intent_id text UNIQUE,
  created_at timestamptz NOT NULL DEFAULT now()
);

-- Admin-only: platform-wide numbers and raw webhook payloads.
CREATE TABLE shared.billing_metrics (
  metric_date date NOT NULL,
  metric text NOT NULL,
  value numeric NOT NULL,
  PRIMARY KEY (metric_date, metric)
);
CREATE TABLE shared.stripe_webhook_events (
  stripe_event_id text PRIMARY KEY,
  event_type text NOT NULL,
  payload jsonb NOT NULL,
  received_at timestamptz NOT NULL DEFAULT now(),
  processed_at timestamptz
);

-- Current-period charges per org and meter, kept fresh by the overage worker.
CREATE TABLE shared.usage_charges (
  org_id uuid NOT NULL,
  period_start timestamptz NOT NULL,
  period_end timestamptz NOT NULL,
  plan_id text NOT NULL,
  meter text NOT NULL,
  quantity bigint NOT NULL,
  included_quantity bigint NOT NULL,
  billable_quantity bigint NOT NULL,
  unit_price_micros bigint NOT NULL,
  amount_micros bigint NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, period_start, meter)
);

-- Quota alerts: at most one per org, period, meter and threshold (the unique key enforces it).
CREATE TABLE shared.usage_alerts (
  alert_id bigserial PRIMARY KEY,
  org_id uuid NOT NULL,
  period_start timestamptz NOT NULL,
  meter text NOT NULL,
  threshold_percent integer NOT NULL CHECK (threshold_percent IN (80, 100)),
  quantity bigint NOT NULL,
  included_quantity bigint NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (org_id, period_start, meter, threshold_percent)
);
