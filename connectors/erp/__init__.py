"""The ERP sink: order, operation and dispatch events upserted into PostgreSQL.

``rows`` maps a decoded event to table rows (pure), ``store`` writes them idempotently, ``schema``
applies the SQL files in ``migrations/``, ``sink`` is the Kafka consumer loop, and ``localdb`` runs
a private PostgreSQL cluster for tests and laptops.
"""
