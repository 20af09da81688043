"""One router per resource: inference (predict, embed), adapters, routes, operations (health, metrics, dashboard)."""
