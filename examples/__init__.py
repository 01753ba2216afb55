"""Runnable examples; each is exercised by a test that runs it as a user would."""
