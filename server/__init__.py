"""The HTTP layer over the ``dpo`` scorer (FastAPI + uvicorn). Arrives with the scoring-server issue."""
