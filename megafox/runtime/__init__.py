"""Process-level helpers shared by every package: files, ranks, ports, CLI errors."""
