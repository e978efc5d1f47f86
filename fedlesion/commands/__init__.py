"""Subcommands, one module each: `register(subparsers)` adds the parser and sets `func=run`."""

from fedlesion.commands import evaluate_cmd, export_cmd, fingerprint_cmd, model_cmd, settings_cmd, synth_cmd, train_cmd

COMMANDS = [settings_cmd, evaluate_cmd, export_cmd, model_cmd, synth_cmd, fingerprint_cmd, train_cmd]
