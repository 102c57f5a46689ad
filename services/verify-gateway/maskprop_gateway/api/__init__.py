"""HTTP layer: dependencies and routes; each route calls one Gateway method."""
