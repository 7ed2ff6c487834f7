"""The built-in demo data: ``textures`` (procedural textures with local defects) and ``objects`` (composed scenes with
logical and component anomalies), generated on first use, seeded."""
