"""The furniture captioning job: images from URLs, files and S3, inlined, scaled, checked."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pandas as pd
import yaml
from conftest import REPO, job_file, read_jsonl, sdk_client
from PIL import Image

from enrichflow.flows.enrich import enrich


def sent_requests(client) -> dict[str, dict]:
    """custom_id -> request body, from every batch input file the server received (the
    jobs that read it keep their files at the provider: `cleanup: false`)."""
    bodies = {}
    for batch in client.batches.list():
        for line in read_jsonl(client, batch.input_file_id):
            bodies[line["custom_id"]] = line["body"]
    return bodies


def image_urls(body: dict) -> list[str]:
    return [p["image_url"]["url"] for p in body["messages"][-1]["content"]
            if p["type"] == "image_url"]


def decode(data_url: str) -> tuple[str, bytes]:
    header, payload = data_url.split(",", 1)
    return header.removeprefix("data:").removesuffix(";base64"), base64.b64decode(payload)


def picture(path: Path, size: tuple[int, int], fmt: str = "PNG") -> Path:
    Image.new("RGB", size, (200, 120, 40)).save(path, format=fmt)
    return path


def test_furniture_job_captions_every_product(prefect_api, start_localbatch, tmp_path,
                                              monkeypatch):
    monkeypatch.chdir(REPO)  # the sample data names its photos relative to the repository
    server = start_localbatch()
    enrich(str(job_file(tmp_path, config="furniture", cleanup=False)), base_url=server.base_url)

    data = pd.read_parquet(tmp_path / "out")
    source = pd.read_csv(REPO / "data" / "furniture.csv")
    assert len(source) >= 50 and data["asin"].tolist() == source["asin"].tolist()
    assert (data["_status"] == "ok").all() and data["caption"].str.len().gt(0).all()

    bodies = sent_requests(sdk_client(server.base_url))
    remote = data[source["primary_image"].str.startswith("https://")].iloc[0]
    assert image_urls(bodies[remote["_custom_id"]]) == [remote["primary_image"]]
    local = data[~source["primary_image"].str.startswith("https://")].iloc[0]
    (url,) = image_urls(bodies[local["_custom_id"]])
    mime, payload = decode(url)
    assert payload == (REPO / local["primary_image"]).read_bytes()
    assert mime == {"png": "image/png", "jpg": "image/jpeg"}[local["primary_image"][-3:]]
    assert bodies[local["_custom_id"]]["messages"][-1]["content"][1]["image_url"]["detail"] \
        == "low"


def test_images_are_scaled_typed_from_bytes_and_listed(prefect_api, start_localbatch, tmp_path):
    big = picture(tmp_path / "big.png", (3000, 1500))
    disguised = picture(tmp_path / "photo.jpg", (40, 30), fmt="PNG")  # PNG bytes, .jpg name
    rows = pd.DataFrame({"title": ["big", "several"], "brand": ["b", "b"],
                         "material": ["m", "m"], "color": ["c", "c"],
                         "images": [json.dumps([str(big)]),
                                    json.dumps([str(disguised), f"file://{disguised}"])]})
    job = job_file(tmp_path, rows, config="furniture", cleanup=False,
                   **{"request.image_max_side": 512, "dataset.id_column": None})
    spec = yaml.safe_load(job.read_text())
    spec["request"]["user"][1]["column"] = "images"
    job.write_text(yaml.safe_dump(spec))
    server = start_localbatch()
    enrich(str(job), base_url=server.base_url)

    data = pd.read_parquet(tmp_path / "out")
    assert (data["_status"] == "ok").all()
    bodies = sent_requests(sdk_client(server.base_url))
    (scaled,) = image_urls(bodies[data.loc[0, "_custom_id"]])
    mime, payload = decode(scaled)
    assert mime == "image/png"
    assert Image.open(io.BytesIO(payload)).size == (512, 256)
    several = image_urls(bodies[data.loc[1, "_custom_id"]])
    assert [decode(u) for u in several] == [("image/png", disguised.read_bytes())] * 2


def test_bad_images_fail_their_row_and_the_job_goes_on(prefect_api, start_localbatch,
                                                       tmp_path):
    good = picture(tmp_path / "good.png", (64, 64))
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not a picture")
    rows = pd.DataFrame({"asin": ["A1", "A2", "A3", "A4"], "title": ["t"] * 4,
                         "brand": ["b"] * 4, "material": ["m"] * 4, "color": ["c"] * 4,
                         "primary_image": [str(good), str(tmp_path / "missing.png"),
                                           str(not_image), None]})
    server = start_localbatch()
    # three of four rows fail: more than the default max_failed_share, which would fail the run
    path = job_file(tmp_path, rows, config="furniture", **{"limits.max_failed_share": 1.0})
    enrich(str(path), base_url=server.base_url)

    data = pd.read_parquet(tmp_path / "out").set_index("asin")
    assert data["_status"].to_dict() == {"A1": "ok", "A2": "failed", "A3": "failed",
                                         "A4": "failed"}
    assert data.loc["A2", "_error"] == (f"row 'A2', column 'primary_image': image "
                                        f"'{tmp_path / 'missing.png'}' does not exist")
    assert data.loc["A3", "_error"].endswith("is not an image Pillow can read")
    assert data.loc["A4", "_error"] == "row 'A4' has no image in column 'primary_image'"
    assert data.loc["A2", "_attempts"] == 0 and pd.isna(data.loc["A2", "_custom_id"])
    assert sdk_client(server.base_url).batches.list().data[0].request_counts.total == 1


def test_shards_are_cut_by_bytes_when_images_are_inlined(prefect_api, start_localbatch,
                                                         tmp_path):
    photo = picture(tmp_path / "photo.png", (200, 200))
    Image.effect_noise((200, 200), 80).convert("RGB").save(photo)  # noise: no compression
    rows = pd.DataFrame({"asin": [f"A{i}" for i in range(12)], "title": ["t"] * 12,
                         "brand": ["b"] * 12, "material": ["m"] * 12, "color": ["c"] * 12,
                         "primary_image": [str(photo)] * 12})
    limit = 4 * len(base64.b64encode(photo.read_bytes())) + 4000
    server = start_localbatch()
    manifest = enrich(str(job_file(tmp_path, rows, config="furniture", cleanup=False, **{
        "limits.max_bytes_per_shard": limit})), base_url=server.base_url)

    shards = manifest["shards"]
    assert len(shards) >= 3 and all(s["bytes"] <= limit for s in shards)
    assert sum(s["rows"] for s in shards) == 12
    client = sdk_client(server.base_url)
    for batch in client.batches.list():
        assert client.files.retrieve(batch.input_file_id).bytes <= limit
    assert (pd.read_parquet(tmp_path / "out")["_status"] == "ok").all()


def test_images_on_s3_are_read_and_inlined(prefect_api, start_localbatch, s3_endpoint, s3,
                                           tmp_path):
    s3.mkdir("photos")
    raw = picture(tmp_path / "p.png", (32, 32)).read_bytes()
    s3.pipe("photos/chair.png", raw)
    rows = pd.DataFrame({"asin": ["S1"], "title": ["t"], "brand": ["b"], "material": ["m"],
                         "color": ["c"], "primary_image": ["s3://photos/chair.png"]})
    server = start_localbatch()
    path = job_file(tmp_path, rows, config="furniture", cleanup=False,
                    storage_options={"endpoint_url": s3_endpoint})
    enrich(str(path), base_url=server.base_url)
    data = pd.read_parquet(tmp_path / "out")
    assert data.loc[0, "_status"] == "ok"
    (url,) = image_urls(sent_requests(sdk_client(server.base_url))[data.loc[0, "_custom_id"]])
    assert decode(url) == ("image/png", raw)
