// Placeholder: replaced by real tests.
import Testing
