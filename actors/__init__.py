"""Actor logic as plain classes (sessions, feeds, presence, projections); `actors.wiring` is the
one module that wraps them in Ray."""
