{
  "algorithm": "ed25519",
  "public_key": "ybj9sAzQnTa3BflHw+oaO/MUtgx3wg0lNQ30brMJEUM=",
  "signature": "0g7xG0UItjA2rNj5RtrJMW/dkJSfH++GszT05hSmCsxEdAaZR2aCLLLsC67Y7T5nGi/7Le6cMWwqQX0FslLeBg=="
}
