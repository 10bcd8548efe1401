// util/python_regex.h: Python `re` patterns (what PEFT's adapter_config.json holds: rank_pattern and
// alpha_pattern keys, a target_modules string) run by std::regex. Torch-free (the fuzz target links it).
//
// std::regex speaks ECMAScript, which differs from Python's dialect: some Python syntax is an error there
// ((?P<name>...), lookbehind) and some is accepted with another meaning (a class starting with ']', a
// '{' that is no quantifier, \A and \Z). So a pattern is never handed to std::regex as it is: it is
// translated token by token into the ECMAScript pattern that matches the same strings, and any construct
// without an exact translation, or that Python itself rejects, is refused (docs/adapter-format.md lists
// the dialect).
#pragma once

#include <regex>
#include <string>

namespace tiedlora::util {

/// The ECMAScript equivalent of the Python pattern `pattern`, for use inside a larger pattern whose
/// groups come first: `groups_before` capturing groups precede it (Python's backreferences and named
/// groups are numbered from there). Throws std::invalid_argument with the reason when there is no exact
/// translation or Python would refuse the pattern.
std::string python_to_ecmascript(const std::string& pattern, int groups_before = 0);

/// PEFT's rule for rank_pattern / alpha_pattern keys: re.match(rf"(.*\.)?({pattern})$", module).
/// Throws std::invalid_argument as python_to_ecmascript.
std::regex compile_peft_key_pattern(const std::string& pattern);

/// PEFT's rule for a target_modules string: re.fullmatch(pattern, module).
std::regex compile_python_fullmatch(const std::string& pattern);

}  // namespace tiedlora::util
