{
  "algorithm": "ed25519",
  "public_key": "ybj9sAzQnTa3BflHw+oaO/MUtgx3wg0lNQ30brMJEUM=",
  "signature": "mIgEeNA9WsoSQatBXldAsSVkRawhfIHtWMgMNwOgGMfHXjgDizRy0S67ycUQuLZn0vdtrSbI1tTIsn+nYNysAw=="
}
