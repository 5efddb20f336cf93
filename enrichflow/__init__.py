"""enrichflow: enrich tables with LLMs through the OpenAI Batch API, orchestrated by Prefect."""
