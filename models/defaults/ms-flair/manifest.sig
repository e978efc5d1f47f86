{
  "algorithm": "ed25519",
  "public_key": "ybj9sAzQnTa3BflHw+oaO/MUtgx3wg0lNQ30brMJEUM=",
  "signature": "0O6uHETZMbFGjgBt++Jc6MPSTDkJMw2KvT4ZIe01mec0GZCLsbtQmQosGXnzBxvEE5bnli1dPnQCcxFPuNjrBw=="
}
