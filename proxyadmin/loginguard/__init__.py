"""Login throttling for the admin: failed logins counted per user name and per client address.

The rule (``LoginFailures``): 5 failures for one user name, or 20 from one client
address, within 15 minutes lock that name or address out for 15 minutes, right
password or not. A successful login clears its user name's count. Counts live in
the database, so every daphne process sees the same ones.
"""
