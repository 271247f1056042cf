"""Head scores: induction, previous-token, duplicate-token and prefix induction."""
