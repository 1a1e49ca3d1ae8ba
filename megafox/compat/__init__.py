"""Workarounds for the installed versions of our dependencies, one module per dependency.

Each workaround names the upstream issue or pull request and the version range it was verified
for (`megafox.compat.megatron_core.WORKAROUNDS`); a test fails when the installed version leaves
that range, so an upgrade is a reviewed change of one file, not a hunt through the code base.
"""
