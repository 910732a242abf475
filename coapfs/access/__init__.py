"""Who may do what, decided before anything is read or spooled: principals (anyone, any
authenticated peer, a credential label, a source network) and the per-path rules that grant
them `read` and `write` (`rules`)."""
