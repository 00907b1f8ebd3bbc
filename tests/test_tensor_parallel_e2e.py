"""The real-client tests (router, structured output, tool calls), through the launcher on the
default model with 3 tensor-parallel shards."""

from __future__ import annotations

import pytest

from tests.conftest import LauncherServer
from tests.test_router_e2e import (  # noqa: F401 - collected again here with the 3-shard server
    reference,
    test_disconnected_streams_free_their_blocks,
    test_grammar_through_the_text_generation_client,
    test_huggingface_hub_inference_client,
    test_openai_client,
    test_sixteen_concurrent_equal_alone,
    test_stop_sequence_is_trimmed_for_openai_and_kept_for_tgi,
    test_structured_output_through_the_real_clients,
    test_text_generation_client,
    test_tool_calls_through_the_real_clients,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LauncherServer(tmp_path_factory.mktemp("tp3"), ["--num-shard", "3"])
    yield srv
    srv.stop()


def test_three_shards_reported(server):
    import httpx

    assert httpx.get(server.url + "/info").json()["num_shards"] == 3
