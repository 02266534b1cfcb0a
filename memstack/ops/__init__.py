"""Ops: each has a plain reference implementation beside its fast path (see ops/<op>/)."""
