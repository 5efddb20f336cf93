"""batchor's basic workflows (its default endpoint, /v1/responses; text, then a Pydantic
output), unchanged, against a Batch API at $OPENAI_BASE_URL."""

import batchor
from pydantic import BaseModel


class Owl(BaseModel):
    tags: list[str]
    summary: str


for output in (None, Owl):
    job = batchor.BatchJob(
        items=[batchor.BatchItem(item_id=str(i), payload=f"Snowy owl {i} hunting at night")
               for i in range(20)],
        build_prompt=lambda item: batchor.PromptParts(prompt=item.payload),
        provider_config=batchor.OpenAIProviderConfig(model="gpt-4.1"),
        structured_output=output,
    )
    results = list(batchor.BatchRunner().run_and_wait(job).results())
    done = [r for r in results if r.status == batchor.ItemStatus.COMPLETED]
    assert len(done) == 20, results
    print(f"batchor ({'text' if output is None else 'structured'}): 20 of 20 completed, "
          f"e.g. {(done[0].output if output else done[0].output_text)!r}")
