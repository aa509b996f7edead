from __future__ import annotations

import dataclasses

import pytest

from app.config import DEFAULT_MODEL, ConfigError, Settings, parse_bytes, setting_variables, unknown_variables


def test_defaults_match_the_design_contract() -> None:
    settings = Settings.from_env({})
    assert settings.model == DEFAULT_MODEL == "intfloat/multilingual-e5-small"
    assert settings.port == 5000
    assert settings.batch_size == 32
    assert settings.memory_elevated_bytes == 2_000_000_000
    assert settings.memory_high_bytes == 2_500_000_000
    assert settings.memory_limit_bytes is None
    assert settings.cleanup_interval_s == 300
    assert settings.cleanup_every_requests == 50
    assert settings.monitor_interval_s == 60
    assert settings.memory_policy == "smart"
    assert settings.allocator == "jemalloc"
    assert settings.trim_after_batch is True
    assert settings.trim_interval_s == 2


def test_values_are_read_from_embedding_variables() -> None:
    settings = Settings.from_env(
        {
            "EMBEDDING_MODEL": "all-minilm-l6-v2",
            "EMBEDDING_BATCH_SIZE": "16",
            "EMBEDDING_MEMORY_HIGH_BYTES": "2.5GB",
            "EMBEDDING_MEMORY_LIMIT_BYTES": "3GiB",
            "EMBEDDING_MEMORY_POLICY": "Legacy",
            "EMBEDDING_CLEANUP_INTERVAL_S": "0.5",
            "EMBEDDING_ADMIN_TOKEN": "s3cret",
            "EMBEDDING_MALLOC_ARENAS": "0",
            "EMBEDDING_PORT": "",  # empty means default
        }
    )
    assert settings.model == "all-minilm-l6-v2"
    assert settings.batch_size == 16
    assert settings.memory_high_bytes == 2_500_000_000
    assert settings.memory_limit_bytes == 3 * 1024**3
    assert settings.memory_policy == "legacy"
    assert settings.cleanup_interval_s == 0.5
    assert settings.admin_token == "s3cret"
    assert settings.malloc_arenas == 0
    assert settings.port == 5000


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1000", 1000), ("2.5GB", 2_500_000_000), ("512MiB", 512 * 1024**2), ("1 kb", 1000), ("7b", 7)],
)
def test_byte_sizes_accept_suffixes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"EMBEDDING_BATCH_SIZE": "lots"}, ("EMBEDDING_BATCH_SIZE", "whole number")),
        ({"EMBEDDING_BATCH_SIZE": "0"}, ("EMBEDDING_BATCH_SIZE", "1 to 4096")),
        ({"EMBEDDING_MAX_BATCH_TOKENS": "0"}, ("EMBEDDING_MAX_BATCH_TOKENS", "at least 1")),
        ({"EMBEDDING_PORT": "70000"}, ("EMBEDDING_PORT", "port number")),
        ({"EMBEDDING_MEMORY_HIGH_BYTES": "2.5 gigs"}, ("EMBEDDING_MEMORY_HIGH_BYTES", "byte size")),
        ({"EMBEDDING_MEMORY_HIGH_BYTES": "1GB"}, ("EMBEDDING_MEMORY_HIGH_BYTES", "ELEVATED")),
        ({"EMBEDDING_MEMORY_POLICY": "aggressive"}, ("EMBEDDING_MEMORY_POLICY", "smart, legacy, off")),
        ({"EMBEDDING_DEVICE": "tpu"}, ("EMBEDDING_DEVICE", "auto")),
        ({"EMBEDDING_CLEANUP_INTERVAL_S": "nan"}, ("EMBEDDING_CLEANUP_INTERVAL_S", "seconds")),
        ({"EMBEDDING_MAX_INPUTS": "100", "EMBEDDING_QUEUE_SIZE": "10"}, ("EMBEDDING_QUEUE_SIZE", "MAX_INPUTS")),
        ({"EMBEDDING_MALLOC_ARENAS": "-1"}, ("EMBEDDING_MALLOC_ARENAS", "0 (the C library's default)")),
        ({"EMBEDDING_TRIM_INTERVAL_S": "-1"}, ("EMBEDDING_TRIM_INTERVAL_S", "seconds")),
        ({"EMBEDDING_ALLOCATOR": "tcmalloc"}, ("EMBEDDING_ALLOCATOR", "jemalloc, glibc")),
        ({"EMBEDDING_LOG_LEVEL": "loud"}, ("EMBEDDING_LOG_LEVEL", "debug")),
    ],
)
def test_a_bad_value_names_the_variable_and_the_accepted_form(env: dict[str, str], names: tuple[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    for part in names:
        assert part in str(caught.value)


def test_unknown_embedding_variables_are_named_with_the_setting_they_resemble() -> None:
    environ = {
        "EMBEDDING_DTYPES": "bfloat16",  # a typo: does nothing
        "EMBEDDING_MEMORY_HIGH": "3GB",
        "EMBEDDING_DTYPE": "float32",  # a setting
        "EMBEDDING_HOME": "/srv/embedding",  # the ops scripts'
        "HOME": "/root",
    }
    assert unknown_variables(environ) == {
        "EMBEDDING_DTYPES": "EMBEDDING_DTYPE",
        "EMBEDDING_MEMORY_HIGH": "EMBEDDING_MEMORY_HIGH_BYTES",
    }
    assert unknown_variables({"EMBEDDING_ZZZ": "1"}) == {"EMBEDDING_ZZZ": None}
    assert unknown_variables({"EMBEDDING_MODEL": "x", "EMBEDDING_PORT": "1"}) == {}


def test_every_setting_has_its_variable() -> None:
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert setting_variables() == {f"EMBEDDING_{name.upper()}" for name in fields}
