{
  "algorithm": "ed25519",
  "public_key": "ybj9sAzQnTa3BflHw+oaO/MUtgx3wg0lNQ30brMJEUM=",
  "signature": "Q8lhPFVamRM9IMLJqRcqntRljVONF7MgMnMKnoqTzDS6jzhPuG2YL62OPsaL9yYRrBLuU3z5KMPdGfNqtm1PAw=="
}
