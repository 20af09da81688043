"""One router per resource: inference (predict, embed), adapters, rollouts, operations (health, metrics, dashboard)."""
