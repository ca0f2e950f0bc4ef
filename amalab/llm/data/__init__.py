"""Preference data: pairs (:mod:`.pairs`), the sources they are read from (:mod:`.sources`), the tasks they
form (:mod:`.tasks`), and the synthetic verifiable tasks the project makes itself (:mod:`.synthetic`)."""
