"""The loop the toolkit exists for: validate (profile -> plan -> simulate | run -> compare), reproduce
the papers' figures, and sweep parameters."""
