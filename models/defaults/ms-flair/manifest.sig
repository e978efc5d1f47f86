{
  "algorithm": "ed25519",
  "public_key": "ybj9sAzQnTa3BflHw+oaO/MUtgx3wg0lNQ30brMJEUM=",
  "signature": "TGGjFQab3DWyKZz4T6MDaUMGgKiYwcRxdLmN4wfDhsDVYe0prbED/y9clU06Sk45OLswJGWi1S6fG5pEdZuJBA=="
}
