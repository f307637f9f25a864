"""Pure, jit-able training losses."""
