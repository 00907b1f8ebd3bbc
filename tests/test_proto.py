"""The compiled descriptor matches TGI's generate.v3 table field by field."""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor

from common.pb import pb

F = FieldDescriptor
OPT, REP = "opt", "rep"

# message -> {field: (type, number, label)}; written from ../shared/PROTOCOL.md.
TABLE = {
    "InfoResponse": "requires_padding:bool=1, dtype:string=2, device_type:string=3, window_size:opt uint32=4, speculate:uint32=5, support_chunking:bool=6, use_prefix_caching:bool=7, attention_impl:string=8, block_size:uint32=9",
    "ServiceDiscoveryResponse": "urls:rep string=1",
    "ClearCacheRequest": "id:opt uint64=1",
    "Image": "data:bytes=1, mimetype:string=2",
    "InputChunk": "text:string=1, image:Image=2",
    "Input": "chunks:rep InputChunk=1",
    "NextTokenChooserParameters": "temperature:float=1, top_k:uint32=2, top_p:float=3, typical_p:float=4, do_sample:bool=5, seed:uint64=6, repetition_penalty:float=7, watermark:bool=8, frequency_penalty:float=9, grammar:string=10, grammar_type:GrammarType=11",
    "StoppingCriteriaParameters": "max_new_tokens:uint32=1, stop_sequences:rep string=2, ignore_eos_token:bool=3",
    "Request": "id:uint64=1, inputs:string=2, truncate:uint32=3, parameters:NextTokenChooserParameters=4, stopping_parameters:StoppingCriteriaParameters=5, prefill_logprobs:bool=6, top_n_tokens:uint32=7, input_chunks:Input=8, blocks:rep uint32=9, slots:rep uint32=10, adapter_id:opt string=11, cache_len:uint32=12, add_special_tokens:bool=13, chunk_len:opt uint32=14",
    "Batch": "id:uint64=1, requests:rep Request=2, size:uint32=3, max_tokens:uint32=4, max_blocks:uint32=5",
    "CachedBatch": "id:uint64=1, request_ids:rep uint64=2, size:uint32=3, max_tokens:uint32=4, current_tokens:uint32=5",
    "GeneratedText": "text:string=1, generated_tokens:uint32=2, finish_reason:FinishReason=3, seed:opt uint64=4",
    "Tokens": "ids:rep uint32=1, logprobs:rep float=2, texts:rep string=3, is_special:rep bool=4",
    "Generation": "request_id:uint64=1, prefill_tokens:Tokens=2, tokens:Tokens=3, generated_text:opt GeneratedText=4, top_tokens:rep Tokens=5",
    "FilterBatchRequest": "batch_id:uint64=1, request_ids:rep uint64=2",
    "FilterBatchResponse": "batch:CachedBatch=1",
    "PrefillRequest": "batch:Batch=1, cached_batch:CachedBatch=2",
    "PrefillResponse": "generations:rep Generation=1, batch:opt CachedBatch=2, forward_ns:uint64=3, decode_ns:uint64=4, total_ns:uint64=5, concat_ns:opt uint64=6",
    "DecodeRequest": "batches:rep CachedBatch=1",
    "DecodeResponse": "generations:rep Generation=1, batch:opt CachedBatch=2, forward_ns:uint64=3, decode_ns:uint64=4, total_ns:uint64=5, concat_ns:opt uint64=6",
    "WarmupRequest": "batch:Batch=1, max_input_tokens:opt uint32=2, max_prefill_tokens:uint32=3, max_total_tokens:opt uint32=4",
    "WarmupResponse": "max_supported_total_tokens:opt uint32=1, max_input_tokens:uint32=2, max_total_tokens:uint32=3",
}
EMPTY = [
    "InfoRequest",
    "ServiceDiscoveryRequest",
    "ClearCacheResponse",
    "HealthRequest",
    "HealthResponse",
]
SCALARS = {
    "bool": F.TYPE_BOOL,
    "string": F.TYPE_STRING,
    "uint32": F.TYPE_UINT32,
    "uint64": F.TYPE_UINT64,
    "float": F.TYPE_FLOAT,
    "bytes": F.TYPE_BYTES,
}
RPCS = {
    "Info": ("InfoRequest", "InfoResponse"),
    "ServiceDiscovery": ("ServiceDiscoveryRequest", "ServiceDiscoveryResponse"),
    "ClearCache": ("ClearCacheRequest", "ClearCacheResponse"),
    "FilterBatch": ("FilterBatchRequest", "FilterBatchResponse"),
    "Warmup": ("WarmupRequest", "WarmupResponse"),
    "Prefill": ("PrefillRequest", "PrefillResponse"),
    "Decode": ("DecodeRequest", "DecodeResponse"),
    "Health": ("HealthRequest", "HealthResponse"),
}


def _parse(row: str):
    for item in row.split(", "):
        name, rest = item.split(":")
        kind, number = rest.split("=")
        label, _, kind = kind.rpartition(" ")
        yield name, kind, int(number), label


def test_package_and_service():
    assert pb.DESCRIPTOR.package == "generate.v3"
    service = pb.DESCRIPTOR.services_by_name["TextGenerationService"]
    assert {m.name: (m.input_type.name, m.output_type.name) for m in service.methods} == RPCS


EXTENSIONS_FROM = 100  # pytgi's own fields; TGI's routers ignore them


def test_extensions_are_numbered_from_100_on_info_and_prefill():
    extended = {
        name: sorted(f.name for f in m.fields if f.number >= EXTENSIONS_FROM)
        for name, m in pb.DESCRIPTOR.message_types_by_name.items()
        if any(f.number >= EXTENSIONS_FROM for f in m.fields)
    }
    assert extended == {
        "InfoResponse": sorted(
            [
                "device_memory_used",
                "device_memory_total",
                "kv_cache_blocks",
                "kv_cache_bytes",
                "device_name",
                "cuda_graph_batch_sizes",
            ]
        ),
        "NextTokenChooserParameters": ["logit_bias", "presence_penalty"],
        "PrefillResponse": ["refused"],
        "Request": ["input_ids"],
    }
    refused = pb.DESCRIPTOR.message_types_by_name["RefusedRequest"]
    assert [(f.name, f.number) for f in refused.fields] == [("request_id", 1), ("message", 2)]


def test_stubs_carry_no_generator_version_guards():
    """So the same stubs import under an older or newer protobuf/grpcio (the GPU machine)."""
    from common import protogen

    for path in protogen.OUTPUTS:
        text = path.read_text()
        assert "ValidateProtobufRuntimeVersion" not in text
        assert "GRPC_GENERATED_VERSION" not in text


def test_every_field_matches_the_table():
    for message_name, row in TABLE.items():
        message = pb.DESCRIPTOR.message_types_by_name[message_name]
        expected = list(_parse(row))
        tgi_fields = [f for f in message.fields if f.number < EXTENSIONS_FROM]
        assert len(tgi_fields) == len(expected), message_name
        for name, kind, number, label in expected:
            field = message.fields_by_name[name]
            assert field.number == number, f"{message_name}.{name}"
            if kind in SCALARS:
                assert field.type == SCALARS[kind], f"{message_name}.{name}"
            elif field.type == F.TYPE_ENUM:
                assert field.enum_type.name == kind
            else:
                assert field.message_type.name == kind, f"{message_name}.{name}"
            is_repeated = field.is_repeated
            assert is_repeated == (label == REP), f"{message_name}.{name}"
            if label == OPT and field.type != F.TYPE_MESSAGE:
                assert field.has_presence, f"{message_name}.{name} must be proto3 optional"
            elif kind in SCALARS and label != REP and not field.containing_oneof:
                assert not field.has_presence, f"{message_name}.{name} must not be optional"
    for message_name in EMPTY:
        assert not pb.DESCRIPTOR.message_types_by_name[message_name].fields


def test_enums_and_oneof():
    assert dict(pb.GrammarType.items()) == {
        "GRAMMAR_TYPE_NONE": 0,
        "GRAMMAR_TYPE_JSON": 1,
        "GRAMMAR_TYPE_REGEX": 2,
        "GRAMMAR_TYPE_LARK": 100,  # pytgi's extension, numbered 100+ as its fields
    }
    assert dict(pb.FinishReason.items()) == {
        "FINISH_REASON_LENGTH": 0,
        "FINISH_REASON_EOS_TOKEN": 1,
        "FINISH_REASON_STOP_SEQUENCE": 2,
    }
    chunk = pb.DESCRIPTOR.message_types_by_name["InputChunk"]
    assert [f.name for f in chunk.oneofs_by_name["chunk"].fields] == ["text", "image"]


def test_table_agrees_with_shared_protocol_doc():
    """When ../shared/PROTOCOL.md is beside the checkout, our table is the same as its."""
    doc = Path(__file__).resolve().parents[2] / "shared" / "PROTOCOL.md"
    if not doc.exists():
        return
    rows = dict(re.findall(r"^\| (\w+) \| ([a-z_]+:[^|]+?) \|$", doc.read_text(), re.M))
    assert len(rows) >= len(TABLE) - 1
    for name, row in TABLE.items():
        if name == "InputChunk":
            continue  # written there as `oneof chunk { ... }`
        assert rows[name].strip() == row, name


def test_every_proto_field_has_a_doc_comment():
    text = (Path(__file__).resolve().parents[1] / "proto" / "generate.proto").read_text()
    lines = text.splitlines()
    field_line = re.compile(r"^\s+(optional |repeated )?[\w.]+ \w+ = \d+;")
    for index, line in enumerate(lines):
        if field_line.match(line):
            assert lines[index - 1].strip().startswith("///"), line
