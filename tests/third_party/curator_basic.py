"""bespokelabs-curator's basic batch workflow, unchanged, against a Batch API at $BASE_URL."""

import os

from bespokelabs import curator

llm = curator.LLM(model_name="gpt-4o-mini", backend="openai", batch=True,
                  backend_params={"base_url": os.environ["BASE_URL"], "api_key": "local",
                                  "batch_check_interval": 1, "require_all_responses": True})
rows = llm([f"Tell me about owl {i}" for i in range(20)]).dataset
assert len(rows) == 20 and all(r["response"] for r in rows), rows
print(f"curator: {len(rows)} of 20 answered, e.g. {rows[0]['response']!r}")
