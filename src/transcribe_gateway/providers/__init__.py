"""Speech engines behind one interface (:mod:`.base`), one module per engine."""
