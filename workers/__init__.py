"""Pipeline stage workers (router, drafter, fusion, coordinator, verifier); see README."""
