"""Secrets in the config are masked wherever the run writes or prints it (spmd_dp/redact.py): by key name in the
mappings a user fills, and credential-looking strings anywhere; the schema's own fields never by name."""

import logging

from spmd_dp import redact
from spmd_dp.config import load_config, to_yaml
from spmd_dp.log import logger, setup_logging


def test_keys_judged_by_name_only_in_free_mappings():
    assert all(redact.secret_key(k) for k in ["key", "secret", "token", "hf_token", "aws_secret_access_key",
                                               "awsSecretAccessKey", "session-token", "password", "api_key",
                                               "client_secret", "connection_string", "use_auth_token", "sas_token"])
    assert not any(redact.secret_key(k) for k in ["endpoint_url", "anon", "key_file", "max_tokens", "tokenizer",
                                                   "stop_token_ids", "connection_timeout", "region_name"])
    cfg = load_config(["+storage_options.secret=s3cr3t-VALUE", "+storage_options.key=AKEYID123",
                       "+storage_options.endpoint_url=http://localhost:9000",
                       "+storage_options.client_kwargs.aws_session_token=tok-ABC-123",
                       "+engine_options.vllm_kwargs.hf_token=hf_notarealtoken", "generation_options.max_tokens=7"])
    d = redact.scrub_config(cfg)
    assert d["storage_options"] == {"secret": "***", "key": "***", "endpoint_url": "http://localhost:9000",
                                    "client_kwargs": {"aws_session_token": "***"}}
    assert d["engine_options"]["vllm_kwargs"] == {"hf_token": "***"}
    assert d["primary_key"] == "id" and d["generation_options"]["max_tokens"] == 7  # schema fields kept
    text = to_yaml(cfg)
    for secret in ("s3cr3t-VALUE", "AKEYID123", "tok-ABC-123", "hf_notarealtoken"):
        assert secret not in text
    assert "endpoint_url: http://localhost:9000" in text
    assert redact.secret_values(cfg) == {"s3cr3t-VALUE", "AKEYID123", "tok-ABC-123", "hf_notarealtoken"}


def test_credential_looking_strings_anywhere():
    line = ("s3://user:hunter22@host/x?X-Amz-Signature=abc123&a=1 AKIAIOSFODNN7EXAMPLE "
            "hf_abcdefghijklmnopqrstuvwxyz0123456789 Authorization: Bearer abcdefghijklmnopqrstuvwxyz "
            "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=c2VjcmV0a2V5;EndpointSuffix=x")
    out = redact.scrub_text(line)
    for secret in ("hunter22", "abc123", "AKIAIOSFODNN7EXAMPLE", "hf_abcdefghij", "abcdefghijklmnopqrstuvwxyz",
                   "c2VjcmV0a2V5"):
        assert secret not in out, (secret, out)
    assert "s3://user:***@host/x?X-Amz-Signature=***&a=1" in out and "AccountName=a;AccountKey=***;" in out
    cfg = load_config(["input_data_path=s3://me:pw-1234@minio/bucket/data.jsonl"])
    assert redact.scrub_config(cfg)["input_data_path"] == "s3://me:***@minio/bucket/data.jsonl"


def test_a_remembered_secret_is_masked_in_every_log_line(capsys):
    cfg = load_config(["+storage_options.secret=zz-the-secret-zz"])
    redact.remember(cfg)
    setup_logging(0, 1)
    logger.setLevel(logging.INFO)
    logger.info("connecting with %s", cfg.storage_options)
    try:
        raise ValueError("bad zz-the-secret-zz")
    except ValueError:
        logger.exception("it failed")
    err = capsys.readouterr().err
    assert "zz-the-secret-zz" not in err and "'secret': '***'" in err and "bad ***" in err
