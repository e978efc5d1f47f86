"""Subcommands, one module each: `register(subparsers)` adds the parser and sets `func=run`."""

from fedlesion.commands import (
    convert_cmd,
    evaluate_cmd,
    export_cmd,
    fingerprint_cmd,
    inspect_cmd,
    model_cmd,
    node_cmd,
    receive_cmd,
    reprocess_cmd,
    segment_cmd,
    send_sample_cmd,
    settings_cmd,
    study_cmd,
    synth_cmd,
    train_cmd,
    user_cmd,
)

COMMANDS = [
    settings_cmd,
    receive_cmd,
    study_cmd,
    reprocess_cmd,
    inspect_cmd,
    convert_cmd,
    evaluate_cmd,
    export_cmd,
    model_cmd,
    synth_cmd,
    fingerprint_cmd,
    train_cmd,
    segment_cmd,
    node_cmd,
    send_sample_cmd,
    user_cmd,
]
