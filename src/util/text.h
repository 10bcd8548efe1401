// util/text.h: two text helpers the file readers share. Torch-free (the fuzz target links it).
#pragma once

#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace tiedlora::util {

/// A name for error messages: in single quotes, printable ASCII kept, every other byte escaped as \xNN,
/// cut after 200 bytes. Untrusted names (from a file being parsed) go through this.
std::string quote_for_message(std::string_view name);

/// `text` for an error message, at most about `limit` characters: a longer text is cut after the last
/// ',' or ' ' before the limit (never inside a word or a JSON string's token) and ends with " ...".
std::string excerpt_for_message(const std::string& text, std::size_t limit = 200);

/// JSON parsing that refuses duplicate keys at any depth (nlohmann keeps the last one silently).
/// Throws tiedlora::FormatError "<source>: not valid JSON (...)" or "<source>: key '<k>' appears twice".
nlohmann::json parse_json_strict(const std::string& text, const std::string& source);

}  // namespace tiedlora::util
