"""bespokelabs-curator's Anthropic batch workflow, unchanged, against the Message Batches
API at $ANTHROPIC_BASE_URL (its key from ANTHROPIC_API_KEY)."""

import os

from bespokelabs import curator

llm = curator.LLM(model_name="claude-haiku-4-5", backend="anthropic", batch=True,
                  backend_params={"base_url": os.environ["ANTHROPIC_BASE_URL"],
                                  "batch_check_interval": 1, "require_all_responses": True})
rows = llm([f"Tell me about owl {i}" for i in range(20)]).dataset
assert len(rows) == 20 and all(r["response"] for r in rows), rows
print(f"curator on anthropic: {len(rows)} of 20 answered, e.g. {rows[0]['response']!r}")
