"""The dinov3 family's tests (collected by pytest from the repository root; not shipped in the wheel)."""
