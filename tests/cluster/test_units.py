"""The cluster's pieces without Ray running: options, routing keys, metrics merge, in-process ASGI."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from server.cluster.asgi_local import HttpRequest, LocalASGI
from server.cluster.config import CONTROL_HEADROOM, ClusterSettings, deployment_options, import_factory
from server.cluster.ingress import adapter_of
from server.cluster.metrics_board import merge


def test_deployment_options_follow_the_batch_and_the_replica_setting():
    fixed = deployment_options(ClusterSettings(replicas=3), max_batch_size=8)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == 8 + CONTROL_HEADROOM
    auto = deployment_options(ClusterSettings(replicas="auto", min_replicas=2, max_replicas=5), 16)
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"]["min_replicas"] == 2 and auto["autoscaling_config"]["max_replicas"] == 5
    assert auto["autoscaling_config"]["target_ongoing_requests"] == 8
    with pytest.raises(ValueError, match="min_replicas"):
        deployment_options(ClusterSettings(replicas="auto", min_replicas=4, max_replicas=2), 8)


@pytest.mark.parametrize("bad", [{"replicas": 0}, {"replicas": "many"}, {"max_adapters_per_replica": 1}])
def test_cluster_settings_refuse_bad_values(bad):
    with pytest.raises(ValidationError) as info:
        ClusterSettings(**bad)
    assert next(iter(bad)) in str(info.value)


def test_factory_import_strings():
    assert import_factory("server.cluster.factories:facet_app").__name__ == "facet_app"
    with pytest.raises(ValueError, match="module:function"):
        import_factory("server.cluster.factories.facet_app")


def test_adapter_of_reads_the_field_each_route_names():
    assert adapter_of("/generate", b'{"adapter": "a1", "model": "x"}') == "a1"
    assert adapter_of("/v1/completions", b'{"model": "a2"}') == "a2"
    assert adapter_of("/v1/chat/completions", b'{"model": "a3", "adapter": "no"}') == "a3"
    assert adapter_of("/generate", b'{"adapter": null}') is None
    assert adapter_of("/generate", b"not json") is None
    assert adapter_of("/generate", b"[1, 2]") is None
    assert adapter_of("/adapters", b'{"adapter": "a1"}') is None


def test_metrics_merge_labels_samples_and_keeps_one_family_header():
    text = (
        "# HELP facet_ready Ready\n# TYPE facet_ready gauge\nfacet_ready 1.0\n"
        '# HELP facet_x_total X\n# TYPE facet_x_total counter\nfacet_x_total{kind="a"} 2.0\n'
    )
    merged = merge({"r1": text, "r2": text.replace("2.0", "5.0")})
    lines = merged.splitlines()
    assert lines.count("# TYPE facet_ready gauge") == 1 and lines.count("# HELP facet_x_total X") == 1
    assert 'facet_ready{replica="r1"} 1.0' in lines and 'facet_ready{replica="r2"} 1.0' in lines
    assert 'facet_x_total{replica="r2",kind="a"} 5.0' in lines
    # a family's samples follow its header (the text format needs families kept together)
    assert lines.index("# TYPE facet_x_total counter") < lines.index(
        'facet_x_total{replica="r1",kind="a"} 2.0'
    )
    assert lines.index('facet_ready{replica="r2"} 1.0') < lines.index("# HELP facet_x_total X")


def _streaming_app(events: list):
    async def ticks(request):
        async def body():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
            finally:
                events.append("closed")

        return StreamingResponse(body(), media_type="text/event-stream", headers={"x-app": "1"})

    return Starlette(routes=[Route("/ticks", ticks)])


def test_local_asgi_streams_chunks_as_sent_and_a_closed_stream_ends_the_app_request():
    async def run():
        events: list = []
        local = LocalASGI(_streaming_app(events))
        await local.startup()
        stream = local.stream(HttpRequest("GET", "/ticks"))
        head = await stream.__anext__()
        assert head[0] == "start" and head[1] == 200 and ("x-app", "1") in head[2]
        chunks = [await stream.__anext__() for _ in range(3)]
        assert chunks == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]  # one chunk per send
        await stream.aclose()  # the caller goes away after 3 of 1000
        assert events == ["closed"]
        await local.shutdown()

    asyncio.run(run())


def test_s3_blobs_with_the_sqlite_index_are_refused_for_several_replicas(tmp_path):
    from server.cluster.app import check_shared_store
    from server.settings import Settings

    s3_sqlite = Settings(data_dir=tmp_path, store_blob_url="s3://bucket/x", store_index_url="sqlite")
    with pytest.raises(ValueError, match="store_index_url"):
        check_shared_store(s3_sqlite, ClusterSettings(replicas=2))
    with pytest.raises(ValueError, match="store_index_url"):
        check_shared_store(s3_sqlite, ClusterSettings(replicas="auto"))
    check_shared_store(s3_sqlite, ClusterSettings(replicas=1))  # one process: as make serve
    check_shared_store(Settings(data_dir=tmp_path), ClusterSettings(replicas=2))  # embedded, one machine
