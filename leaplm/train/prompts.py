"""Held-out training prompts for self-distilled draft heads (EAGLE/Medusa style).

Draft heads are trained on the target model's own answers to a set of prompts, so the prompts only need to look
like real chat traffic; they never need reference answers. This module builds that set offline, with no
downloads and no hub datasets: every prompt is composed here from hand-written templates, topic lists, code
snippets and short passages (all written for leaplm, none copied from a dataset), plus some fixed prompts.

Categories mirror real usage - coding (about 30%, mostly Python, also JavaScript/SQL/shell/C and friends), math,
writing, roleplay, reasoning, extraction, summarization, translation, stem, humanities, open qa and multi-step
instructions.

Held-out guarantee: the evaluation sets leaplm reports on - Spec-Bench (``question.jsonl``) and HumanEval - share
no word 8-gram (lowercased, whitespace-split) with any prompt here. ``tests/train/test_prompts.py`` enforces this,
so a template edit that drifts towards an evaluation prompt fails the test suite.

Everything is deterministic: composition uses fixed string seeds, and ``training_prompts(n, seed)`` only
shuffles and interleaves the fixed pool.
"""
from __future__ import annotations

import datetime
import functools
import random
from collections.abc import Callable
from itertools import permutations, product

__all__ = ["CATEGORIES", "training_prompts"]


def _fence(lang: str, code: str) -> str:
    return f"```{lang}\n{code.strip()}\n```"


def _rng(name: str) -> random.Random:
    """A generator seeded by a fixed string (stable across runs and PYTHONHASHSEED)."""
    return random.Random(f"leaplm-train-{name}")


# ---------------------------------------------------------------------------------------------------- coding

_FUNC_TASKS = [
    "checks whether a string is a palindrome, ignoring case, spaces and punctuation",
    "merges two sorted lists into one sorted list in linear time",
    "returns the k most frequent words in a text, breaking ties alphabetically",
    "flattens an arbitrarily nested list of integers",
    "groups a list of words into anagram families",
    "converts a Roman numeral string to an integer",
    "converts an integer between 1 and 3999 to a Roman numeral",
    "keeps a running median of a stream of numbers",
    "finds the longest common prefix shared by a list of strings",
    "validates that the brackets (), [] and {} in a string are balanced",
    "splits a list into chunks of a given size, where the last chunk may be shorter",
    "parses a duration such as '1h30m15s' into a number of seconds",
    "formats a number of bytes as a human-readable size such as '3.2 MiB'",
    "rotates a square matrix 90 degrees clockwise in place",
    "lists all distinct permutations of a string, even when letters repeat",
    "computes the Levenshtein edit distance between two strings",
    "finds the first character in a string that never repeats",
    "performs binary search on a sorted list and returns the insertion point when the target is missing",
    "removes duplicates from a list while preserving the original order",
    "counts the islands in a grid made of '0' and '1' characters",
    "returns the length of the shortest path between two cells of a maze given as a list of strings",
    "computes the prime factorization of a positive integer",
    "generates every prime below n with the sieve of Eratosthenes",
    "checks whether a partially filled 9x9 Sudoku board breaks any rule",
    "converts a camelCase identifier to snake_case",
    "wraps a paragraph to a maximum line width without breaking words",
    "computes the moving average of a list for a given window size",
    "finds two numbers in a list that add up to a target and returns their positions",
    "reads a CSV file and returns the average of a named numeric column, skipping blank cells",
    "retries a callable up to n times with exponential backoff between attempts",
    "implements an LRU cache class whose get and put run in O(1)",
    "merges overlapping intervals given as (start, end) pairs",
    "returns row n of Pascal's triangle",
    "encodes a string with run-length encoding and decodes it back",
    "checks whether two binary trees have the same shape and values",
    "topologically sorts a dependency graph and reports any cycle it finds",
    "computes the greatest common divisor and the least common multiple of a list of integers",
    "parses a simple INI-style configuration text into a nested dictionary",
    "works out the weekday of a 'YYYY-MM-DD' date without using the datetime module",
    "finds the contiguous slice of a list with the largest sum",
    "transposes a list of rows that have different lengths, padding the gaps with None",
    "validates an IPv4 address string",
    "counts the vowels and the consonants in a sentence",
    "evaluates arithmetic expressions with + - * / and parentheses using two stacks",
    "turns a nested dictionary into a flat one whose keys are dotted paths",
    "returns the longest substring that has no repeated characters",
    "models a bank account class with deposit, withdraw and a transaction history",
    "checks whether a number is an Armstrong (narcissistic) number",
    "generates a random password of a given length with at least one digit, one capital letter and one symbol",
    "finds every file with a given extension below a directory and returns their total size",
    "implements a min-heap class without using heapq",
    "returns the power set of a list",
    "returns the Collatz sequence that starts from a positive integer",
    "lazily batches any iterable into tuples of size n with a generator",
    "reverses the order of words in a sentence while keeping punctuation attached to its word",
    "scores a game of ten-pin bowling from a list of rolls",
    "prints a Celsius-to-Fahrenheit conversion table with aligned columns",
    "finds the kth largest element of an unsorted list in expected linear time",
    "implements a trie with insert, search and starts_with methods",
    "detects whether a singly linked list contains a cycle",
    "counts the ways to climb n stairs when each move is one or two steps",
    "counts word frequencies across several text files and writes the totals to a JSON file",
    "serializes a binary tree to a string and rebuilds the tree from that string",
    "computes the area of a polygon from its vertices with the shoelace formula",
    "checks whether the letters of a string can be rearranged into a palindrome",
    "returns the fewest coins needed to pay an amount with given denominations",
    "masks every digit of a card number except the last four",
    "parses a URL query string into a dictionary that maps each key to a list of values",
    "implements a rate limiter that allows at most n calls per rolling minute",
    "pretty-prints a table of dictionaries as aligned text columns",
]
_PY_ONLY = ("datetime", "heapq")
_PY_STYLES = [
    "Write a Python function that {t}.",
    "Write Python code that {t}. Use type hints and include a docstring.",
    "Implement Python code that {t}, and explain its time and space complexity.",
    "I need Python code that {t}. Please add a few example calls with the output you expect.",
    "Can you show me how to write Python code that {t}? Keep it readable rather than clever.",
    "Write an efficient Python solution that {t}, then list the edge cases you handled.",
]
_OTHER_LANGS = ["JavaScript", "TypeScript", "Go", "Rust", "C", "Java", "C++"]
_OTHER_STYLES = [
    "Write {lang} code that {t}.",
    "Show me idiomatic {lang} code that {t}, with a short explanation of the design.",
]

_EXPLAIN_SNIPPETS: list[tuple[str, str]] = [
    ("python", """
def chunked(seq, size):
    it = iter(seq)
    while batch := list(itertools.islice(it, size)):
        yield batch
"""),
    ("python", """
counts = collections.Counter(w.lower().strip(".,!?") for line in open(path) for w in line.split())
print(counts.most_common(3))
"""),
    ("python", """
class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.start
        return False
"""),
    ("python", """
@functools.lru_cache(maxsize=None)
def ways(n):
    if n < 0:
        return 0
    if n == 0:
        return 1
    return ways(n - 1) + ways(n - 3) + ways(n - 4)
"""),
    ("python", """
table = [[r * c for c in range(1, 6)] for r in range(1, 6)]
diag = [table[i][i] for i in range(len(table))]
print(sum(diag), max(map(max, table)))
"""),
    ("python", """
def retry(times):
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for attempt in range(times):
                try:
                    return fn(*args, **kwargs)
                except Exception:
                    if attempt == times - 1:
                        raise
        return wrapper
    return deco
"""),
    ("python", """
inventory = {"apples": 4, "pears": 0, "plums": 7}
restock = sorted(k for k, v in inventory.items() if v < 5)
inventory |= {k: 10 for k in restock}
"""),
    ("python", """
async def fetch_all(session, urls):
    tasks = [asyncio.create_task(session.get(u)) for u in urls]
    done = await asyncio.gather(*tasks, return_exceptions=True)
    return [r for r in done if not isinstance(r, Exception)]
"""),
    ("javascript", """
const groupBy = (items, key) =>
  items.reduce((acc, item) => {
    (acc[item[key]] ||= []).push(item);
    return acc;
  }, {});
"""),
    ("javascript", """
function debounce(fn, ms) {
  let timer;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}
"""),
    ("javascript", """
const totals = orders
  .filter(o => o.status === "paid")
  .map(o => o.items.reduce((s, i) => s + i.price * i.qty, 0))
  .sort((a, b) => b - a)
  .slice(0, 3);
"""),
    ("javascript", """
document.querySelectorAll("button[data-toggle]").forEach(btn => {
  btn.addEventListener("click", () => {
    document.getElementById(btn.dataset.toggle).classList.toggle("hidden");
  });
});
"""),
    ("sql", """
SELECT c.name, COUNT(o.id) AS orders, SUM(o.total) AS spent
FROM customers c
LEFT JOIN orders o ON o.customer_id = c.id AND o.created_at >= DATE '2024-01-01'
GROUP BY c.name
HAVING COUNT(o.id) > 2
ORDER BY spent DESC;
"""),
    ("sql", """
WITH ranked AS (
  SELECT dept, name, salary,
         ROW_NUMBER() OVER (PARTITION BY dept ORDER BY salary DESC) AS rn
  FROM employees
)
SELECT dept, name, salary FROM ranked WHERE rn <= 2;
"""),
    ("sql", """
UPDATE stock s
SET quantity = s.quantity - d.qty
FROM deliveries d
WHERE d.sku = s.sku AND d.shipped = TRUE;
"""),
    ("bash", """
find . -name "*.log" -mtime +7 -print0 | xargs -0 gzip -9
"""),
    ("bash", """
for f in *.jpg; do
  convert "$f" -resize 50% "small_${f}"
done
"""),
    ("bash", """
grep -rhoE "[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\\.[a-z]{2,}" docs/ | sort | uniq -c | sort -rn | head
"""),
    ("bash", """
set -euo pipefail
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$1" -C "$tmp"
ls "$tmp"
"""),
    ("c", """
size_t count_bits(unsigned int x) {
    size_t n = 0;
    while (x) {
        x &= x - 1;
        n++;
    }
    return n;
}
"""),
    ("c", """
void reverse(char *s) {
    char *end = s + strlen(s) - 1;
    while (s < end) {
        char tmp = *s;
        *s++ = *end;
        *end-- = tmp;
    }
}
"""),
    ("c", """
int *grow(int *arr, size_t *cap) {
    size_t new_cap = *cap ? *cap * 2 : 4;
    int *p = realloc(arr, new_cap * sizeof *p);
    if (!p) return NULL;
    *cap = new_cap;
    return p;
}
"""),
]
_EXPLAIN_STYLES = [
    "Explain what this {lang} code does, step by step:\n\n{code}",
    "Describe in plain English what this {lang} snippet is for, and point out any edge cases it does not handle.\n\n{code}",
    "I found this {lang} code in our repository. Can you walk me through it and suggest a clearer name for it?\n\n{code}",
    "Review this {lang} code as if it were a pull request: comment on correctness, readability and performance.\n\n{code}",
]

# (language, what it should do, what goes wrong, code)
_BUGGY: list[tuple[str, str, str, str]] = [
    ("python", "return the mean of a list of numbers", "it crashes with ZeroDivisionError when the list is empty", """
def average(values):
    return sum(values) / len(values)
"""),
    ("python", "add an item to a shopping basket and return the basket",
     "items from earlier calls keep showing up in new baskets", """
def add_item(item, basket=[]):
    basket.append(item)
    return basket
"""),
    ("python", "remove every negative number from a list in place", "some negative numbers survive", """
def drop_negatives(nums):
    for i, n in enumerate(nums):
        if n < 0:
            nums.pop(i)
    return nums
"""),
    ("python", "build three callbacks that print 0, 1 and 2", "all three callbacks print 2", """
callbacks = [lambda: print(i) for i in range(3)]
for cb in callbacks:
    cb()
"""),
    ("python", "count how often each word appears in a file", "every count comes out as 1", """
def word_counts(path):
    counts = {}
    with open(path) as fh:
        for word in fh.read().split():
            counts[word] = 1
    return counts
"""),
    ("python", "return the position of target in a sorted list, or -1", "it never terminates for some inputs", """
def find(xs, target):
    lo, hi = 0, len(xs) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if xs[mid] < target:
            lo = mid
        elif xs[mid] > target:
            hi = mid - 1
        else:
            return mid
    return -1
"""),
    ("python", "check that a list of price strings adds up to an expected total",
     "the check sometimes fails even when the prices look right", """
def total_matches(prices, expected):
    return sum(float(p) for p in prices) == expected
"""),
    ("python", "copy a 3x3 grid and change one cell of the copy", "the original grid changes too, in several rows", """
grid = [[0] * 3] * 3
copy = grid[:]
copy[1][1] = 5
print(grid)
"""),
    ("python", "read a number from the user and double it", "it prints the typed digits twice instead", """
n = input("Number: ")
print(n * 2)
"""),
    ("python", "tell whether a year is a leap year", "it claims that 1900 was a leap year", """
def is_leap(year):
    return year % 4 == 0 or year % 400 == 0
"""),
    ("python", "work out how many days remain until an ISO date",
     "it raises TypeError about offset-naive and offset-aware datetimes", """
from datetime import datetime, timezone

def days_until(iso):
    target = datetime.fromisoformat(iso)
    return (target - datetime.now(timezone.utc)).days
"""),
    ("python", "merge user overrides into default settings without touching the defaults",
     "the defaults dictionary is modified after the first call", """
DEFAULTS = {"theme": "light", "font": 12}

def settings(overrides):
    merged = DEFAULTS
    merged.update(overrides)
    return merged
"""),
    ("javascript", "add up the prices of the items in a cart", "the result is a long string such as '012.54.99'", """
function cartTotal(items) {
  let total = 0;
  for (const item of items) total += item.price;
  return total;
}
// prices come from form inputs: [{price: "12.5"}, {price: "4.99"}]
"""),
    ("javascript", "log the numbers 0 to 4 after a short delay", "it logs 5 five times", """
for (var i = 0; i < 5; i++) {
  setTimeout(() => console.log(i), 100);
}
"""),
    ("javascript", "sort scores from highest to lowest", "[25, 100, 3] ends up in a strange order", """
const scores = [25, 100, 3];
scores.sort().reverse();
"""),
    ("javascript", "fetch a user and return their name", "the caller always gets undefined", """
function getName(id) {
  fetch(`/api/users/${id}`)
    .then(res => res.json())
    .then(user => user.name);
}
"""),
    ("sql", "list the customers who have never placed an order",
     "it returns no rows, although such customers exist", """
SELECT name FROM customers
WHERE id NOT IN (SELECT customer_id FROM orders);
-- orders.customer_id is NULL for guest checkouts
"""),
    ("sql", "count the orders placed on each day of March", "orders from 31 March are missing", """
SELECT DATE(created_at) AS day, COUNT(*)
FROM orders
WHERE created_at BETWEEN '2024-03-01' AND '2024-03-31'
GROUP BY day;
"""),
    ("bash", "rename every .txt file in the folder to .md", "files whose names contain spaces break it", """
for f in $(ls *.txt); do
  mv $f ${f%.txt}.md
done
"""),
    ("bash", "stop with an error when the config file is missing", "the script fails on the very first line", """
CONFIG = "./app.conf"
if [ ! -f $CONFIG ]; then
  echo "missing config" >&2
  exit 1
fi
"""),
    ("c", "copy a user name into a fixed buffer and greet the user",
     "it sometimes prints garbage after the name", """
char name[8];
strncpy(name, input, sizeof name);
printf("Hello, %s\\n", name);
"""),
    ("c", "add up the elements of an array", "the result is wrong and changes between runs", """
int sum(int *a, int n) {
    int total;
    for (int i = 0; i <= n; i++)
        total += a[i];
    return total;
}
"""),
]
_BUG_STYLES = [
    "This {lang} code should {goal}, but {symptom}. Find the bug and fix it.\n\n{code}",
    "Debug the following {lang} snippet.\nExpected: it should {goal}.\nActual: {symptom}.\n\n{code}",
    "There is a bug in this code (it is meant to {goal}). Explain the cause, then give a corrected version.\n\n{code}",
]

_TESTABLE: list[tuple[str, str]] = [
    ("python", """
def slugify(title: str) -> str:
    words = re.findall(r"[a-z0-9]+", title.lower())
    return "-".join(words)
"""),
    ("python", """
def clamp(x: float, lo: float, hi: float) -> float:
    if lo > hi:
        raise ValueError("lo must not exceed hi")
    return max(lo, min(x, hi))
"""),
    ("python", """
def parse_version(s: str) -> tuple[int, int, int]:
    parts = s.lstrip("v").split(".")
    if len(parts) != 3:
        raise ValueError(f"bad version: {s}")
    return tuple(int(p) for p in parts)
"""),
    ("python", """
def shipping_cost(weight_kg: float, express: bool = False) -> float:
    if weight_kg <= 0:
        raise ValueError("weight must be positive")
    base = 4.5 if weight_kg <= 1 else 4.5 + 1.2 * math.ceil(weight_kg - 1)
    return round(base * (1.8 if express else 1.0), 2)
"""),
    ("python", """
class Stack:
    def __init__(self):
        self._items = []

    def push(self, item):
        self._items.append(item)

    def pop(self):
        if not self._items:
            raise IndexError("pop from empty stack")
        return self._items.pop()

    def __len__(self):
        return len(self._items)
"""),
    ("python", """
def initials(full_name: str) -> str:
    return "".join(part[0].upper() for part in full_name.split() if part)
"""),
    ("python", """
def merge_ranges(ranges):
    out = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out
"""),
    ("python", """
def to_fahrenheit(celsius: float) -> float:
    if celsius < -273.15:
        raise ValueError("below absolute zero")
    return celsius * 9 / 5 + 32
"""),
    ("javascript", """
export function formatPrice(cents, currency = "USD") {
  return new Intl.NumberFormat("en-US", { style: "currency", currency }).format(cents / 100);
}
"""),
    ("javascript", """
export function chunk(arr, size) {
  if (size <= 0) throw new RangeError("size must be positive");
  const out = [];
  for (let i = 0; i < arr.length; i += size) out.push(arr.slice(i, i + size));
  return out;
}
"""),
]
_TEST_FRAMEWORKS = {
    "python": ["pytest", "pytest with @pytest.mark.parametrize", "the unittest module", "Hypothesis property-based tests"],
    "javascript": ["Jest", "Vitest", "Node's built-in node:test runner", "Mocha with Chai assertions"],
}
_TEST_STYLES = [
    "Write {fw} tests for this function. Cover normal inputs, edge cases and error cases.\n\n{code}",
    "Here is a small {lang} function. Write a thorough test suite for it using {fw}, and say briefly what each "
    "test checks.\n\n{code}",
]

_MESSY: list[tuple[str, str]] = [
    ("python", """
def process(d):
    r = []
    for k in d.keys():
        if d[k] != None:
            if type(d[k]) == str:
                r.append(k + "=" + d[k].strip())
            else:
                r.append(k + "=" + str(d[k]))
    return "&".join(r)
"""),
    ("python", """
def grade(score):
    if score >= 90:
        return "A"
    else:
        if score >= 80:
            return "B"
        else:
            if score >= 70:
                return "C"
            else:
                if score >= 60:
                    return "D"
                else:
                    return "F"
"""),
    ("python", """
f = open("data.txt")
lines = f.readlines()
total = 0
count = 0
for i in range(len(lines)):
    line = lines[i]
    if line.strip() != "":
        total = total + int(line)
        count = count + 1
print(total / count)
f.close()
"""),
    ("python", """
class User:
    def __init__(self, name, email, age):
        self.name = name
        self.email = email
        self.age = age

    def to_dict(self):
        return {"name": self.name, "email": self.email, "age": self.age}

    def __eq__(self, other):
        return self.name == other.name and self.email == other.email and self.age == other.age
"""),
    ("python", """
def find_duplicates(items):
    dups = []
    for i in range(len(items)):
        for j in range(len(items)):
            if i != j and items[i] == items[j] and items[i] not in dups:
                dups.append(items[i])
    return dups
"""),
    ("python", """
import requests

def get_weather(city):
    r = requests.get("https://api.example.com/weather?city=" + city)
    data = r.json()
    temp = data["main"]["temp"]
    return "It is " + str(round(temp - 273.15)) + " degrees in " + city
"""),
    ("python", """
def stats(nums):
    mean = sum(nums) / len(nums)
    s = 0
    for n in nums:
        s += (n - mean) ** 2
    var = s / len(nums)
    srt = sorted(nums)
    if len(nums) % 2 == 0:
        med = (srt[len(nums)//2 - 1] + srt[len(nums)//2]) / 2
    else:
        med = srt[len(nums)//2]
    return mean, var, med
"""),
    ("javascript", """
function getUserLabel(user) {
  var label = "";
  if (user) {
    if (user.profile) {
      if (user.profile.nickname) {
        label = user.profile.nickname;
      } else {
        label = user.firstName + " " + user.lastName;
      }
    }
  }
  return label;
}
"""),
    ("javascript", """
function loadConfig(path, cb) {
  fs.readFile(path, "utf8", function (err, text) {
    if (err) return cb(err);
    try {
      cb(null, JSON.parse(text));
    } catch (e) {
      cb(e);
    }
  });
}
"""),
    ("c", """
int max3(int a, int b, int c) {
    if (a > b) {
        if (a > c) return a;
        else return c;
    } else {
        if (b > c) return b;
        else return c;
    }
}
"""),
]
_REFACTOR_GOALS = [
    "Refactor this {lang} code to be more idiomatic and concise, without changing its behaviour.",
    "Rewrite this {lang} code so it is easier to read: clearer names and small, focused functions.",
    "Make this {lang} code more robust: add type information where the language allows it, validate inputs "
    "and handle errors sensibly.",
    "Can this {lang} code be made faster or simpler? Show the improved version and explain what changed.",
]

_SQL_SCHEMAS = {
    "customers(id, name, country, signup_date), orders(id, customer_id, created_at, total), "
    "order_items(order_id, product_id, qty, unit_price), products(id, name, category, price)": [
        "the five products with the highest revenue over the last 30 days",
        "customers who placed at least one order in every month of 2023",
        "the average order value per country, only for countries with at least ten customers",
        "each customer's first order date together with their lifetime spend",
        "products that have never been ordered",
        "the month-over-month percentage change in total revenue",
        "each category's share of revenue for every year",
        "customers whose most recent order is older than 180 days",
    ],
    "students(id, name, year), courses(id, title, credits), enrollments(student_id, course_id, term, grade)": [
        "each student's credit-weighted average grade",
        "courses with more than 30 students enrolled in the 'Fall 2024' term",
        "students who have taken every course worth 5 credits",
        "the top grade in each course together with the student who earned it",
        "the number of students in each year who failed at least one course (grade below 50)",
        "pairs of students who have at least three courses in common",
    ],
    "page_views(user_id, url, viewed_at), signups(user_id, signed_up_at, plan)": [
        "daily active users for the last 14 days",
        "the weekly conversion rate from first page view to signup",
        "the five pages most often viewed just before a signup",
        "sessions, where a new session starts after 30 minutes without a page view, and the mean session length",
        "users who viewed the pricing page three or more times but never signed up",
    ],
    "employees(id, name, manager_id, dept, salary, hired_on)": [
        "every employee next to the name of their manager",
        "the whole chain of managers above a given employee, using a recursive CTE",
        "departments whose average salary is above the company-wide average",
        "a running total of hires by month",
        "employees who earn more than their own manager",
    ],
}
_SQL_STYLES = [
    "Given these tables: {schema}\nWrite a SQL query that returns {q}.",
    "Using PostgreSQL, write a query for {q}. The tables are {schema}. Explain how the query works.",
    "I use SQLite. Tables: {schema}. How do I get {q}? Please mention any index that would help.",
]

_SHELL_TASKS = [
    "lists the ten largest files below the current directory",
    "counts the lines of Python code in a project while skipping the .venv folder",
    "renames every file in a folder to lowercase",
    "prints the ten most frequent client IP addresses in an nginx access log",
    "replaces one string with another in every .yaml file of a directory tree",
    "backs up a directory into a tar.gz archive whose name includes a timestamp",
    "checks whether a website answers with HTTP 200 and prints a warning otherwise",
    "deletes local git branches that are already merged into main",
    "follows a log file and shows only the lines that contain ERROR as they arrive",
    "shows which process is listening on port 8080",
    "converts every .wav file in a folder to .mp3 with ffmpeg",
    "splits a large CSV file into parts of 10,000 lines, repeating the header in each part",
    "shows how much disk space each subdirectory uses, largest first",
    "finds duplicate files by comparing their checksums",
    "takes the second column of a tab-separated file and removes duplicate values",
    "runs a command every five minutes and appends its output to a log",
    "waits until a TCP port accepts connections before starting a service",
    "downloads the URLs listed in a text file, four at a time in parallel",
    "compares two directories and lists the files that differ",
    "creates a Python virtual environment and installs requirements.txt only if the environment is missing",
    "counts how many times each HTTP status code appears in an access log",
    "resizes all PNG images in a folder to at most 800 pixels wide",
    "finds every TODO comment in a codebase and prints the file name and line number",
    "generates a random 32-character hexadecimal token",
    "shows the 20 most recently modified files in a directory tree",
    "adds up the numbers in the third column of a CSV file",
    "prints the last commit date of every file tracked in a git repository",
    "archives log files older than 30 days into a dated folder",
]
_SHELL_STYLES = [
    "Write a bash one-liner or short script that {t}.",
    "On Linux, how can I write a shell command that {t}? Explain each part of the pipeline.",
    "Write a portable POSIX sh script that {t}, with comments.",
]

_CONCEPTS = [
    "the difference between a list and a tuple in Python, and when to prefer each",
    "how Python's garbage collector deals with reference cycles",
    "what the GIL is and how it affects multithreaded Python programs",
    "the difference between `is` and `==` in Python",
    "how Python generators work and why they save memory",
    "what decorators are in Python, with a simple example",
    "how async and await work in Python and when asyncio is a good fit",
    "the difference between shallow and deep copies in Python",
    "how Python's method resolution order works with multiple inheritance",
    "what `__slots__` does and when it is worth using",
    "how context managers work and how to write one with contextlib",
    "the difference between *args and **kwargs",
    "how dataclasses differ from ordinary classes and from NamedTuple",
    "whether list comprehensions are really faster than loops, and why",
    "how Python's import system finds modules",
    "what Python type hints do at runtime and which tools check them",
    "the difference between a process pool and a thread pool in concurrent.futures",
    "the difference between a stack and a queue, with real uses of each",
    "how a hash table handles collisions",
    "Big-O notation, with examples of O(1), O(log n), O(n) and O(n^2) code",
    "what a race condition is and how locks prevent it",
    "the difference between TCP and UDP from an application developer's point of view",
    "how HTTPS protects data in transit",
    "what a REST API is and how it differs from GraphQL",
    "how database indexes speed up queries and what they cost",
    "the different kinds of SQL joins",
    "what database transactions and isolation levels are",
    "how git rebase differs from git merge",
    "what dependency injection is and why it makes testing easier",
    "the difference between unit, integration and end-to-end tests",
    "how the JavaScript event loop works",
    "the difference between let, const and var in JavaScript",
    "what closures are, with an example in JavaScript",
    "how promises improve on callbacks in JavaScript",
    "what pointers are in C and how they relate to arrays",
    "the difference between stack and heap memory in C",
    "what undefined behaviour means in C, with three common examples",
    "how a compiler differs from an interpreter",
    "how to turn a recursive function into an iterative one",
    "how dynamic programming differs from plain recursion",
    "what a Docker container is and how it differs from a virtual machine",
    "environment variables versus config files for application settings",
    "how regular expressions work, with a few practical patterns",
    "what Unicode and UTF-8 are, and why string length can be surprising",
    "how floating-point numbers are stored and why 0.1 + 0.2 is not exactly 0.3",
    "the SOLID principles, with one short example each",
    "how a cache with a time-to-live works and common ways to invalidate caches",
    "what a memory leak looks like in a garbage-collected language",
    "how binary search trees work and why they need balancing",
    "the CAP theorem in plain language",
]
_CONCEPT_STYLES = [
    "Explain {c}.",
    "Can you explain {c}? Include a short code example.",
    "I'm preparing for a technical interview. Explain {c} concisely, then give one follow-up question an "
    "interviewer might ask.",
]


def _coding() -> list[str]:
    out = [style.format(t=t) for t in _FUNC_TASKS for style in _PY_STYLES]
    others = [t for t in _FUNC_TASKS if not any(w in t for w in _PY_ONLY) and "class" not in t]
    for i, t in enumerate(others):
        lang = _OTHER_LANGS[i % len(_OTHER_LANGS)]
        out += [style.format(lang=lang, t=t) for style in _OTHER_STYLES]
    names = {"python": "Python", "javascript": "JavaScript", "sql": "SQL", "bash": "shell", "c": "C"}
    for lang, code in _EXPLAIN_SNIPPETS:
        out += [style.format(lang=names[lang], code=_fence(lang, code)) for style in _EXPLAIN_STYLES]
    for lang, goal, symptom, code in _BUGGY:
        out += [style.format(lang=names[lang], goal=goal, symptom=symptom, code=_fence(lang, code))
                for style in _BUG_STYLES]
    for lang, code in _TESTABLE:
        out += [style.format(fw=fw, lang=names[lang], code=_fence(lang, code))
                for fw in _TEST_FRAMEWORKS[lang] for style in _TEST_STYLES]
    for lang, code in _MESSY:
        out += [goal.format(lang=names[lang]) + "\n\n" + _fence(lang, code) for goal in _REFACTOR_GOALS]
    for schema, questions in _SQL_SCHEMAS.items():
        out += [style.format(schema=schema, q=q) for q in questions for style in _SQL_STYLES]
    out += [style.format(t=t) for t in _SHELL_TASKS for style in _SHELL_STYLES]
    out += [style.format(c=c) for c in _CONCEPTS for style in _CONCEPT_STYLES]
    return out


# ---------------------------------------------------------------------------------------------------------- math

_NAMES = ["Amara", "Bilal", "Chen", "Dagny", "Esteban", "Farah", "Goran", "Hina", "Ines", "Jonah", "Kemal", "Leila",
          "Mateo", "Nadia", "Olu", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Yara", "Zeno"]


def _poly(r: random.Random, degree: int) -> str:
    terms = []
    for p in range(degree, -1, -1):
        c = r.randint(-7, 9) if p < degree else r.randint(1, 6)
        if c == 0:
            continue
        mag = "" if abs(c) == 1 and p > 0 else str(abs(c))
        var = "" if p == 0 else ("x" if p == 1 else f"x^{p}")
        sign = ("-" if c < 0 else "") if not terms else (" - " if c < 0 else " + ")
        terms.append(f"{sign}{mag}{var}")
    return "".join(terms)


def _signed(c: int, var: str = "") -> str:
    return f" - {abs(c)}{var}" if c < 0 else f" + {c}{var}"


def _m_change(r: random.Random) -> str:
    n = r.choice(_NAMES)
    a, b = r.randint(2, 9), r.randint(2, 9)
    p, q = r.choice([1.25, 1.5, 2.75, 3.2, 4.5, 0.85]), r.choice([0.6, 1.1, 1.35, 2.4])
    bill = next(x for x in (10, 20, 50, 100) if x > a * p + b * q)
    x, y = r.choice([("notebooks", "pens"), ("apples", "pears"), ("stamps", "envelopes"), ("bagels", "muffins"),
                     ("packets of seeds", "plant pots"), ("postcards", "fridge magnets")])
    return (f"{n} buys {a} {x} at ${p:.2f} each and {b} {y} at ${q:.2f} each, paying with a ${bill} note. "
            f"How much change should {n} get back?")


def _m_speed(r: random.Random) -> str:
    d1, d2 = r.choice([60, 90, 120, 150, 180]), r.choice([40, 80, 100, 140, 200])
    v1, v2 = r.choice([40, 60, 80, 90, 120]), r.choice([50, 75, 100, 110])
    what = r.choice(["A train", "A coach", "A delivery van", "A car"])
    return (f"{what} covers {d1} km at {v1} km/h and then another {d2} km at {v2} km/h. What is the average "
            f"speed over the whole trip, and why is it not simply the mean of the two speeds?")


def _m_discount(r: random.Random) -> str:
    item = r.choice(["winter jacket", "desk lamp", "road bike", "pair of hiking boots", "tent", "blender"])
    price, d, t = r.choice([48, 75, 120, 249, 360, 89]), r.choice([10, 15, 20, 25, 30, 40]), r.choice([5, 8, 12, 20])
    return (f"A {item} costs ${price}. The shop takes {d}% off, and then {t}% sales tax is added to the reduced "
            f"price. What is the final price? Would it differ if the tax were added before the discount?")


def _m_hoses(r: random.Random) -> str:
    a, b = r.sample([12, 15, 20, 24, 30, 36, 40, 45, 60], 2)
    thing = r.choice([("hose", "paddling pool"), ("pump", "water tank"), ("printer", "batch of flyers"),
                      ("painter", "fence")])
    return (f"One {thing[0]} can finish a {thing[1]} in {a} minutes and a second {thing[0]} can finish it in "
            f"{b} minutes. How long does the job take when both work together?")


def _m_ages(r: random.Random) -> str:
    a, b = r.sample(_NAMES, 2)
    young, k, ratio = r.randint(3, 15), r.randint(2, 10), r.choice([2, 3])
    gap = (ratio - 1) * (young + k)
    return (f"{a} is {gap} years older than {b}. In {k} years, {a} will be {ratio} times as old as {b}. "
            f"How old is each of them today?")


def _m_recipe(r: random.Random) -> str:
    food = r.choice(["pancakes", "muffins", "servings of soup", "cookies", "portions of risotto"])
    s, t = r.sample([4, 6, 8, 10, 12, 18, 24], 2)
    g, e, m = r.choice([150, 200, 250, 320]), r.choice([1, 2, 3]), r.choice([120, 200, 300, 450])
    return (f"A recipe for {s} {food} needs {g} g of flour, {e} eggs and {m} ml of milk. How much of each do I "
            f"need for {t} {food}? Round sensibly where a fraction of an egg appears.")


def _m_interest(r: random.Random) -> str:
    p, rate, y = r.choice([500, 1000, 2500, 4000, 10000]), r.choice([2, 3, 3.5, 4, 5, 6]), r.choice([3, 5, 8, 10])
    freq = r.choice(["yearly", "monthly", "quarterly"])
    return (f"If I put ${p} into a savings account paying {rate}% interest a year, compounded {freq}, how much "
            f"will be in the account after {y} years? Compare it with simple interest over the same period.")


def _m_path(r: random.Random) -> str:
    l, w, p = r.randint(8, 30), r.randint(5, 20), r.choice([0.5, 1, 1.5, 2])
    return (f"A rectangular garden is {l} m long and {w} m wide. A gravel path {p} m wide runs all the way round "
            f"the outside of it. What is the area of the path, and how many 25 kg bags of gravel are needed if "
            f"one bag covers 1.5 square metres?")


def _m_marbles(r: random.Random) -> str:
    red, blue, green = r.randint(2, 8), r.randint(2, 8), r.randint(1, 6)
    colour = r.choice(["red", "blue", "green", "the same colour", "different colours"])
    return (f"A bag holds {red} red, {blue} blue and {green} green marbles. Two marbles are drawn without "
            f"replacement. What is the probability that they are {colour if 'colour' in colour else 'both ' + colour}?")


def _m_fuel(r: random.Random) -> str:
    l, c, d = r.choice([4.8, 5.5, 6.2, 7.5, 8.9]), r.choice([1.62, 1.75, 1.89, 2.05]), r.choice([180, 240, 310, 420])
    return (f"My car uses {l} litres of fuel per 100 km and fuel costs €{c:.2f} per litre. How much will the "
            f"fuel cost for a round trip to a town {d} km away? If three friends share the cost, what does each pay?")


def _m_average(r: random.Random) -> str:
    n = r.choice(_NAMES)
    while True:
        scores = [r.randint(55, 95) for _ in range(r.randint(3, 6))]
        target = sum(scores) // len(scores) + r.randint(2, 6)
        need = target * (len(scores) + 1) - sum(scores)
        if need <= 100:
            break
    listed = ", ".join(map(str, scores))
    return (f"{n}'s scores on the first {len(scores)} quizzes were {listed}. What score does {n} need on the next "
            f"quiz to raise the average to exactly {target}?")


def _m_ratio(r: random.Random) -> str:
    a, b, c = r.sample(_NAMES, 3)
    x, y, z = r.sample([1, 2, 3, 4, 5, 7], 3)
    total = (x + y + z) * r.choice([40, 75, 120, 150, 300])
    return f"{a}, {b} and {c} share ${total} in the ratio {x}:{y}:{z}. How much does each of them receive?"


def _m_wage(r: random.Random) -> str:
    n, w, h = r.choice(_NAMES), r.choice([14, 16.5, 18, 22, 27.5]), r.randint(42, 58)
    return (f"{n} earns ${w} an hour, and every hour beyond 40 in a week is paid at one and a half times that "
            f"rate. Last week {n} worked {h} hours. What were the gross earnings for the week?")


def _m_mixture(r: random.Random) -> str:
    low, mid, high = sorted(r.sample([5, 10, 12, 20, 25, 30, 40, 50], 3))
    v = r.choice([2, 4, 5, 8, 10])
    return (f"How many litres of a {high}% sugar solution must be mixed with {v} litres of a {low}% solution to get "
            f"a {mid}% solution?")


def _m_consecutive(r: random.Random) -> str:
    k, start = r.choice([3, 4, 5, 6, 7]), r.randint(-5, 60)
    kind = r.choice(["integers", "even integers", "odd integers"])
    step = 1 if kind == "integers" else 2
    if kind != "integers":
        start = 2 * start + (0 if kind == "even integers" else 1)
    return f"The sum of {k} consecutive {kind} is {sum(start + step * i for i in range(k))}. What are they?"


def _m_clock(r: random.Random) -> str:
    h, m = r.randint(1, 12), r.choice([5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55])
    return f"What is the smaller angle between the hour hand and the minute hand of a clock at {h}:{m:02d}?"


def _m_multiply(r: random.Random) -> str:
    a, b = r.randint(23, 989), r.randint(12, 97)
    op = r.choice(["×", "÷"])
    if op == "÷":
        return f"Work out {a * b} ÷ {b} using long division, showing every step."
    return f"Calculate {a} × {b} by hand, showing the partial products."


def _m_system(r: random.Random) -> str:
    x, y = r.randint(-6, 9), r.randint(-6, 9)
    while True:
        a, b, d, e = (r.randint(1, 7) for _ in range(4))
        if a * -e - b * d != 0:
            break
    return (f"Solve the system of equations {a}x + {b}y = {a * x + b * y} and {d}x - {e}y = {d * x - e * y}, "
            f"then check the solution by substitution.")


def _m_quadratic(r: random.Random) -> str:
    r1, r2 = r.randint(-9, 9), r.randint(-9, 9)
    lead = r.choice([1, 1, 2, 3])
    p, q = -lead * (r1 + r2), lead * r1 * r2
    head = "x^2" if lead == 1 else f"{lead}x^2"
    mid = "" if p == 0 else _signed(p, "x")
    tail = "" if q == 0 else _signed(q)
    return f"Solve {head}{mid}{tail} = 0 and verify both roots."


def _m_calculus(r: random.Random) -> str:
    f = _poly(r, r.randint(2, 4))
    x0, a = r.randint(-3, 4), r.randint(0, 2)
    return r.choice([
        f"Find the derivative of f(x) = {f} and evaluate f'({x0}).",
        f"Evaluate the definite integral of {f} with respect to x from {a} to {a + r.randint(1, 3)}.",
        f"Find the stationary points of f(x) = {f} and say whether each is a maximum, a minimum or neither.",
    ])


def _m_multiples(r: random.Random) -> str:
    k, n = r.choice([3, 4, 6, 7, 9, 11, 13]), r.choice([100, 250, 500, 1000, 2024])
    return f"What is the sum of all the multiples of {k} between 1 and {n}? Explain a shortcut that avoids adding them one by one."


def _m_bases(r: random.Random) -> str:
    n = r.randint(20, 4000)
    return f"Convert {n} from decimal to binary and to hexadecimal, and explain the method."


def _m_gcd(r: random.Random) -> str:
    g = r.choice([2, 3, 4, 6, 7, 12, 15, 18])
    a, b = g * r.randint(5, 60), g * r.randint(5, 60)
    return f"Use the Euclidean algorithm to find the greatest common divisor of {a} and {b}, then find their least common multiple."


def _m_growth(r: random.Random) -> str:
    a = r.randint(8, 90) * 1000
    b = int(a * r.uniform(1.05, 1.8)) // 10 * 10
    y = r.choice([4, 5, 8, 10, 12])
    place = r.choice(["A town's population", "A website's monthly visitors", "A charity's annual donations",
                      "The number of members in a sports club"])
    return (f"{place} grew from {a:,} to {b:,} over {y} years. What was the total percentage increase, and what "
            f"constant yearly growth rate would give the same result?")


_MATH_MAKERS: list[Callable[[random.Random], str]] = [
    _m_change, _m_speed, _m_discount, _m_hoses, _m_ages, _m_recipe, _m_interest, _m_path, _m_marbles, _m_fuel,
    _m_average, _m_ratio, _m_wage, _m_mixture, _m_consecutive, _m_clock, _m_multiply, _m_system, _m_quadratic,
    _m_calculus, _m_multiples, _m_bases, _m_gcd, _m_growth,
]
_MATH_SUFFIXES = ["", " Show your reasoning step by step.", " Explain each step briefly.",
                  " Put the final answer on its own line at the end.", " Think it through carefully before answering."]


def _math() -> list[str]:
    r = _rng("math")
    return [make(r) + r.choice(_MATH_SUFFIXES) for make in _MATH_MAKERS for _ in range(14)]


# ------------------------------------------------------------------------------------------------------- writing

_EMAIL_PURPOSES = [
    "to your landlord asking for a leaking kitchen tap to be repaired",
    "to a colleague declining a meeting invitation and proposing another time",
    "to a customer apologising for a delayed shipment and offering a discount",
    "to your team announcing that the office will close early on Friday",
    "to a professor asking for an extension on a term paper",
    "to a hiring manager following up a week after a job interview",
    "to a neighbour about a dog that barks late at night",
    "to a supplier asking for a quote for 500 printed tote bags",
    "to a client summarising the decisions made on today's call",
    "to your manager asking to work from home two days a week",
    "to a conference organiser proposing a talk on accessible web design",
    "to the parents of a school class inviting them to a science fair",
    "to a gym cancelling your membership",
    "to a former colleague asking whether they would act as a reference",
    "to a software vendor reporting a bug that blocks your whole team",
    "to a new employee welcoming them and explaining their first week",
    "to a restaurant praising a waiter who handled a difficult situation well",
    "to a city councillor supporting a new pedestrian crossing near a school",
    "to a book club announcing the next title and meeting place",
    "to an airline requesting a refund for a cancelled flight",
    "to a group of volunteers thanking them after a charity fun run",
    "to a freelancer negotiating a lower rate for a six-month project",
    "to IT support explaining that your laptop no longer starts after an update",
    "to a friend you have not spoken to in years, now that you have moved back to their town",
]
_EMAIL_TONES = ["polite and formal", "friendly but professional", "brief and direct", "warm"]
_EMAIL_STYLES = [
    "Write a {tone} email {p}.",
    "Draft an email {p}. Keep it {tone} and under 150 words.",
    "Compose a {tone} message {p}, and suggest a subject line.",
]

_STORY_PREMISES = [
    "a lighthouse keeper who finds a message in a bottle addressed to her",
    "a robot that is learning to bake bread",
    "two rival food-truck owners forced to share one parking spot",
    "a child who can hear what houseplants are thinking",
    "the last human-run bookshop in a city run by algorithms",
    "a retired detective who is asked to find a missing cat",
    "a time traveller stuck in a single Tuesday afternoon",
    "a village where it has not rained for seven years",
    "an astronaut who gets a phone call from Earth that should be impossible",
    "a cellist who loses her hearing a week before a big concert",
    "a mapmaker who discovers a street that is on no map",
    "a shy teenager who becomes the voice of the school radio station",
    "a chess game between an old man and a stranger on a night train",
    "a ghost who is afraid of the family moving into its house",
    "a beekeeper who notices her bees spelling out words",
    "two strangers stuck in a lift during a blackout",
    "an inventor whose umbrella can stop time for ten seconds",
    "a grandmother teaching her grandson to fish for the first time",
    "a translator who realises a diplomatic letter was mistranslated on purpose",
    "a small town that elects a dog as its mayor",
]
_STORY_GENRES = ["science fiction", "mystery", "comic", "heartwarming", "fantasy", "noir", "slice-of-life",
                 "suspense"]
_STORY_CONSTRAINTS = ["in under 300 words", "told in the first person", "that ends with a twist",
                      "written as a series of diary entries", "with plenty of dialogue", "for children aged 6 to 8",
                      "in exactly five paragraphs", "in the present tense"]

_POEM_FORMS = ["a sequence of three haiku", "a sonnet", "a limerick", "a free-verse poem", "a villanelle",
               "a short rhyming poem for children", "a poem in rhyming couplets", "an ode"]
_POEM_SUBJECTS = [
    "the first snowfall of winter", "a city at four in the morning", "an old pair of boots",
    "the smell of rain on hot pavement", "a grandmother's kitchen", "a broken compass", "the moon over a harbour",
    "learning to ride a bicycle", "a library after closing time", "the patience of trees",
    "commuting on a crowded train", "a cup of coffee going cold", "migrating geese",
    "the last day of the summer holidays", "a cat watching birds through a window", "a lost umbrella",
    "debugging code at midnight", "the sea at low tide", "a garden in early spring", "the quiet after a storm",
    "an abandoned railway station", "a letter that was never sent", "the first day at a new school",
    "wind turbines on a hill", "a street market at dusk",
]
_POEM_STYLES = ["Write {form} about {s}.", "Compose {form} about {s}, using vivid, concrete imagery.",
                "Could you write {form} about {s}? Give it a title too."]

_ESSAY_TOPICS = [
    "whether homework should be abolished in primary schools", "the effect of remote work on city centres",
    "why public libraries still matter", "the benefits and risks of self-driving cars",
    "whether social media does teenagers more good than harm", "the value of learning a second language as an adult",
    "what makes a good teacher", "the role of zoos in protecting endangered species", "paper books versus e-books",
    "the importance of sleep for students", "whether cities should ban private cars from their centres",
    "the case for a four-day working week", "how video games can teach problem-solving",
    "the ethics of consumer genetic testing", "why failure is an important part of learning",
    "the impact of fast fashion on the environment", "whether voting should be compulsory",
    "the influence of advertising on children", "the role of volunteering in building communities",
    "how smartphones changed the way we travel", "whether art education should be compulsory",
    "the future of local newspapers", "urban gardening as a response to food insecurity",
    "the pros and cons of mass tourism for small islands",
]
_ESSAY_KINDS = ["argumentative", "persuasive", "compare-and-contrast", "reflective", "expository"]
_ESSAY_LENGTHS = ["500-word", "short", "five-paragraph", "two-page"]

_PRODUCTS = [
    "a stainless-steel insulated bottle that keeps drinks cold for 24 hours",
    "a foldable standing desk for small flats", "noise-cancelling headphones aimed at students",
    "a handmade ceramic mug with a speckled glaze", "a solar-powered camping lantern with a USB port",
    "an ergonomic mechanical keyboard with quiet switches", "organic loose-leaf green tea from a family farm",
    "a children's picture book about a brave little submarine",
    "a smart plant pot that reminds you when to water", "a waterproof hiking jacket made from recycled plastic",
    "a cast-iron skillet pre-seasoned with flaxseed oil", "a language app that teaches through short stories",
    "a compact espresso machine for home baristas", "a wooden puzzle box with a hidden compartment",
    "a set of reusable beeswax food wraps", "an e-reader with a warm front light and a week of battery life",
    "a dog harness with reflective stitching", "a weekly vegetarian meal-kit subscription",
    "a slim leather wallet with RFID blocking", "a beginner's watercolour painting kit",
    "a power bank strong enough to charge a laptop", "a lavender-scented soy candle",
    "a coding robot for kids that follows lines drawn on paper", "an adjustable dumbbell set for home workouts",
]
_PRODUCT_CHANNELS = ["an online shop listing", "a short Instagram caption with hashtags",
                     "a 50-word catalogue blurb", "a bullet list of key features for a marketplace page"]

_WRITING_FIXED = [
    "Write a wedding toast for my older sister, a nurse who loves hiking. It should take under two minutes to say.",
    "Write a LinkedIn post announcing that I have started a new job as a data engineer.",
    "Write the opening paragraph of a blog post about learning to cook at fifty.",
    "Write a cover letter for a junior graphic designer role at a small agency that works with charities.",
    "Write a eulogy for a much-loved community gardener who taught half the neighbourhood to grow tomatoes.",
    "Write a pep talk for a youth football team that has lost its last three matches.",
    "Write a thank-you note to the teacher who helped me finally pass maths.",
    "Write a script for a 30-second radio advert for a new bicycle repair shop.",
    "Write the introduction to the spring newsletter of a neighbourhood association.",
    "Write the 'About us' page for a family-run Vietnamese restaurant.",
    "Write a sincere public apology from a company whose app exposed users' email addresses.",
    "Write a bedtime story about a sleepy dragon who cannot find a comfortable cave.",
    "Write a product update announcement for a note-taking app that has just added offline mode.",
    "Write a two-paragraph review of an imaginary science fiction film called 'The Quiet Orbit'.",
    "Write a dialogue between a tomato and a cucumber arguing about which of them makes a salad.",
    "Write a short speech for the retirement party of a school caretaker who worked there for 35 years.",
    "Write a fundraising letter for an animal shelter that urgently needs a new roof.",
    "Write a personal statement for a master's programme in environmental engineering.",
    "Rewrite the sentence 'The meeting has moved to Thursday.' in five tones: formal, casual, sarcastic, poetic "
    "and urgent.",
    "Write a thread of five social media posts encouraging people to visit their local museum.",
    "Write a horror story of exactly 100 words set at a supermarket self-checkout.",
    "Write song lyrics, two verses and a chorus, about missing the last bus home.",
    "Write a short, charming introduction for my grandmother's lemon cake recipe.",
    "Write a playful text message inviting friends to a board game night.",
    "Write a one-page play in which two astronauts argue about what to name a new planet.",
    "Write a friendly out-of-office reply for a two-week holiday that gives an alternative contact.",
    "Write a press release announcing that a small town will host a regional cheese festival.",
    "Write a letter from a cat to its owner complaining about the new dog.",
    "Write the first paragraph of a mystery novel set in a snowed-in mountain hotel.",
    "Write a fable about patience featuring a tortoise and a crow, and end it with a moral.",
]


def _writing() -> list[str]:
    r = _rng("writing")
    out = []
    for i, p in enumerate(_EMAIL_PURPOSES):
        out += [_EMAIL_STYLES[(i + k) % 3].format(tone=_EMAIL_TONES[(i + 2 * k) % 4], p=p) for k in range(3)]
    for p in _STORY_PREMISES:
        for g, c in zip(r.sample(_STORY_GENRES, 3), r.sample(_STORY_CONSTRAINTS, 3)):
            out.append(f"Write a short {g} story about {p}, {c}.")
    for s in _POEM_SUBJECTS:
        out += [r.choice(_POEM_STYLES).format(form=form, s=s) for form in r.sample(_POEM_FORMS, 3)]
    for t in _ESSAY_TOPICS:
        for kind in r.sample(_ESSAY_KINDS, 2):
            out.append(f"Write a {r.choice(_ESSAY_LENGTHS)} {kind} essay on {t}.")
        out.append(f"Give me a detailed outline for an essay on {t}, with a thesis statement and three main points.")
    for p in _PRODUCTS:
        out += [f"Write {ch} for {p}." for ch in r.sample(_PRODUCT_CHANNELS, 2)]
    return out + _WRITING_FIXED


# ------------------------------------------------------------------------------------------------------ roleplay

_PERSONAS = [
    "a grumpy but kind lighthouse keeper on a remote island", "a medieval blacksmith in a busy market town",
    "a cheerful tour guide showing visitors around Lisbon", "the captain of a cargo starship in the year 2300",
    "a Victorian detective famous for noticing tiny details", "a patient piano teacher meeting a new adult student",
    "the quartermaster of a pirate ship who keeps the accounts", "a ranger in a mountain national park",
    "a barista who has worked the early shift for twenty years",
    "a wizard running a very bureaucratic office for magic licences", "a jazz trumpeter in 1920s New Orleans",
    "a friendly librarian in a small-town library", "a fitness coach who talks only in sports metaphors",
    "a museum curator of ancient Egyptian objects", "a dragon who has guarded the same hoard for 800 years and is bored",
    "a hotel concierge in Paris who knows every hidden restaurant",
    "a spaceship computer that is extremely polite and slightly dramatic",
    "a sommelier explaining wine to a complete beginner",
    "a Stone Age hunter seeing modern technology for the first time",
    "a television news anchor reporting from a fairy-tale kingdom",
    "a gardener who has won the village flower show ten years running",
    "a retired astronaut visiting a primary school", "a cautious bank manager reviewing a very unusual loan request",
    "a travelling merchant selling potions of doubtful quality", "a stern but fair football referee",
]
_ROLE_QUESTIONS = [
    "what does a normal day look like for you?", "what is the hardest part of your work?",
    "what advice would you give someone just starting out?", "tell me about the strangest thing that ever happened to you.",
    "what do you do when things go badly wrong?", "what do people usually misunderstand about you?",
    "how did you end up doing this?", "describe the place where you spend most of your time.",
    "what are you proudest of?", "if you could change one thing about your world, what would it be?",
]
_ROLE_USERS = ["a curious traveller", "a new apprentice", "a journalist writing a profile of you",
               "a child on a school trip", "a nervous first-time customer"]
_ROLE_STYLES = [
    "You are {p}. Stay in character for the rest of our chat. My first question: {q}",
    "Let's do a roleplay. You play {p}, and I am {u}. {Q}",
    "Act as {p} and answer in character: {q}",
    "Roleplay as {p}. Keep your answers vivid and in the first person. I'm {u}, and my question is: {q}",
]
_INTERVIEW_JOBS = ["junior Python developer", "nurse on a children's ward", "barista", "data analyst",
                   "primary school teacher", "product manager", "warehouse team leader", "graphic designer",
                   "customer support agent", "civil engineer", "sous-chef", "site reliability engineer"]
_SUPPORT_CASES = [
    ("an internet provider", "connection has dropped every evening for a week"),
    ("an online clothes shop", "parcel arrived with the wrong size twice"),
    ("a bank", "card was blocked while travelling abroad"),
    ("a train company", "train was cancelled and I missed a job interview"),
    ("a mobile phone network", "bill is double what it normally is"),
    ("a furniture store", "sofa delivery has been rescheduled three times"),
    ("a software company", "subscription renewed after I cancelled it"),
    ("a hotel", "room was given to someone else even though I had a booking"),
]
_PRACTICE_LANGS = ["French", "Spanish", "German", "Italian", "Japanese", "Portuguese"]
_PRACTICE_SCENES = ["ordering food in a café", "asking for directions at a train station", "checking into a hotel",
                    "chatting with a new neighbour"]


def _roleplay() -> list[str]:
    r = _rng("roleplay")
    out = []
    for p in _PERSONAS:
        for q in r.sample(_ROLE_QUESTIONS, 6):
            u = r.choice(_ROLE_USERS)
            out.append(r.choice(_ROLE_STYLES).format(p=p, q=q, Q=q[0].upper() + q[1:], u=u))
    for job in _INTERVIEW_JOBS:
        out.append(f"Pretend to be an interviewer hiring a {job}. Ask me one question at a time, wait for my answer, "
                   f"and give me honest feedback before moving on.")
    for company, problem in _SUPPORT_CASES:
        out.append(f"Act as a customer support agent for {company}. I'll play an upset customer whose {problem}. "
                   f"Stay calm and helpful, and start the conversation.")
    for lang in _PRACTICE_LANGS:
        for scene in r.sample(_PRACTICE_SCENES, 2):
            out.append(f"Be my {lang} conversation partner for a role-play about {scene}. Speak only simple {lang}, "
                       f"and after each of my replies add a short correction in English.")
    out += [
        "Run a short text adventure for me. I wake up in an empty train carriage at night. Describe the scene and "
        "wait for my commands.",
        "You are the narrator of a cosy fantasy tavern game. I am a traveller who has just walked in out of the "
        "rain. Set the scene and introduce two characters I could talk to.",
        "Play a stubborn medieval king whom I, his advisor, must convince to build a bridge instead of a new castle "
        "tower.",
        "Pretend you are my future self, twenty years from now, writing back to answer my worries about "
        "changing careers.",
        "You are Socrates. I will claim that happiness means getting what you want; question me about it.",
    ]
    return out


# ----------------------------------------------------------------------------------------------------- reasoning

_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_NONSENSE = ["blickets", "wugs", "zorbs", "fendles", "quimps", "tarvs", "snibs", "dorgles", "mimbles", "prazzes",
             "vorks", "glints"]
# (premises, conclusion) templates; validity is for the model to work out.
_SYLLOGISMS = [
    ("All {a} are {b}. All {b} are {c}.", "all {a} are {c}"),
    ("All {a} are {b}. Some {b} are {c}.", "some {a} are {c}"),
    ("No {a} are {b}. All {c} are {b}.", "no {c} are {a}"),
    ("Some {a} are {b}. No {b} are {c}.", "some {a} are not {c}"),
    ("All {a} are {b}. No {c} are {b}.", "no {a} are {c}"),
    ("Some {a} are {b}. Some {b} are {c}.", "some {a} are {c}"),
    ("All {a} are {b}. Some {c} are not {b}.", "some {c} are not {a}"),
    ("No {a} are {b}. No {b} are {c}.", "no {a} are {c}"),
]
_ORDER_SETTINGS = [
    ("{n} ran a 5 km race.", "{x} crossed the line directly ahead of {y}.", "In what order did they finish?"),
    ("{n} arrived at a party one after another.", "{x} arrived just before {y}.", "Who arrived last?"),
    ("{n} are standing in a queue for a bakery.", "{x} is immediately in front of {y}.",
     "Who is at the front of the queue, and who is third?"),
    ("{n} live on different floors of the same building, one per floor.", "{x} lives one floor above {y}.",
     "Who lives on the top floor, and who lives at the bottom?"),
]
_RIDDLES = [
    "You have eight coins that look identical, but one is slightly heavier. With only two uses of a balance "
    "scale, how can you find the heavy coin?",
    "Three switches outside a closed room control one lamp inside. You may flip the switches as often as you like "
    "but may enter the room only once. How can you tell which switch controls the lamp?",
    "A farmer must ferry a fox, a goose and a sack of grain across a river in a boat that carries only the farmer "
    "and one other thing. Left alone, the fox eats the goose and the goose eats the grain. How does everything "
    "get across safely?",
    "With a 3-litre jug, a 5-litre jug and a tap, how can you measure exactly 4 litres of water?",
    "A notebook and a pencil together cost $2.40, and the notebook costs $2.00 more than the pencil. How much is "
    "the pencil? Explain why the first answer that comes to mind is wrong.",
    "Six printers take six minutes to print six posters. How long would 60 printers take to print 60 posters?",
    "A patch of mould doubles in area every day and covers a slice of bread after 20 days. On which day did it "
    "cover half of the slice?",
    "Four friends must cross a rickety bridge at night with a single torch, at most two at a time. They need 1, 2, "
    "5 and 10 minutes to cross, and a pair walks at the slower person's pace. What is the fastest way to get "
    "everyone across?",
    "There are 23 people at a party. Is it more likely than not that two of them share a birthday? Explain the "
    "idea without heavy formulas.",
    "A snail climbs 3 metres up a 10-metre wall each day and slides back 2 metres each night. On which day does "
    "it reach the top?",
    "Two ropes each take exactly one hour to burn, but they burn unevenly. How can you use them to time 45 minutes?",
    "A drawer holds 10 black and 10 white socks, and the room is dark. How many socks must you take to be sure of "
    "a matching pair? How many to be sure of two black socks?",
    "Is the sentence 'This sentence is false' true or false? Explain the paradox.",
    "One hundred lockers start closed. Student 1 opens every locker, student 2 toggles every second locker, "
    "student 3 toggles every third one, and so on up to student 100. Which lockers end up open, and why?",
    "A clock loses 10 minutes every hour. It is set correctly at noon. What is the real time when the clock "
    "shows 6 p.m.?",
    "Three boxes are labelled 'apples', 'oranges' and 'mixed', and every label is wrong. You may take one fruit "
    "from one box without looking inside. How can you relabel all three boxes correctly?",
    "A woman points at a photograph and says: 'I have no brothers or sisters, but this girl's mother is my "
    "mother's daughter.' Who is in the photograph?",
    "Two trains 150 km apart head towards each other at 60 km/h and 90 km/h. A bird flies back and forth between "
    "them at 120 km/h until they meet. How far does the bird fly in total?",
    "You toss a fair coin until you get two heads in a row. On average, how many tosses does that take?",
    "Two opposite corner squares are removed from an 8x8 chessboard. Can the remaining 62 squares be covered "
    "exactly by 31 dominoes? Explain.",
    "A trader sells one item for $60 at a 20% profit and another for $60 at a 20% loss. Overall, did the trader "
    "gain, lose or break even?",
    "With a 7-minute hourglass and an 11-minute hourglass, how can you time exactly 15 minutes?",
    "Twelve players enter a chess tournament and each plays every other player once. How many games are played, "
    "and how can you see it without listing them?",
    "If you are told that every even number greater than 2 in a list is the sum of two primes, what would you "
    "need to check to disprove the claim for that list?",
    "A cube painted red on every face is cut into 27 equal small cubes. How many small cubes have exactly two "
    "red faces, how many have one, and how many have none?",
]


def _order_puzzles(r: random.Random) -> list[str]:
    out = []
    for _ in range(44):
        intro, clue, question = r.choice(_ORDER_SETTINGS)
        people = r.sample(_NAMES, r.choice([4, 5]))
        pairs = list(zip(people, people[1:]))
        r.shuffle(pairs)
        group = ", ".join(sorted(people)[:-1]) + " and " + sorted(people)[-1]
        clues = " ".join(clue.format(x=x, y=y) for x, y in pairs)
        out.append(f"{intro.format(n=group)} {clues} {question}")
    return out


def _age_puzzles(r: random.Random) -> list[str]:
    out = []
    for _ in range(28):
        a, b = r.sample(_NAMES, 2)
        back, ratio, young_then = r.randint(2, 12), r.choice([2, 3, 4]), r.randint(2, 12)
        old_now, young_now = ratio * young_then + back, young_then + back
        out.append(f"The ages of {a} and {b} add up to {old_now + young_now}. {back} years ago, {a} was {ratio} "
                   f"times as old as {b}. How old are they now?")
    return out


def _sequence_puzzles(r: random.Random) -> list[str]:
    out = []
    for i in range(40):
        kind = i % 7
        if kind == 0:
            s, d = r.randint(-20, 40), r.choice([-7, -3, 4, 6, 9, 11, 13])
            seq = [s + d * k for k in range(6)]
        elif kind == 1:
            s, q = r.randint(1, 5), r.choice([2, 3, -2, 5])
            seq = [s * q ** k for k in range(6)]
        elif kind == 2:
            c = r.randint(-4, 6)
            seq = [k * k + c for k in range(1, 7)]
        elif kind == 3:
            x, c, seq = r.randint(2, 6), r.choice([1, -1, 3]), []
            for _ in range(6):
                seq.append(x)
                x = 2 * x + c
        elif kind == 4:
            seq = [r.randint(1, 5), r.randint(2, 8)]
            while len(seq) < 7:
                seq.append(seq[-1] + seq[-2])
        elif kind == 5:
            a, b, x, seq = r.randint(2, 9), -r.randint(1, 5), r.randint(1, 20), []
            for k in range(7):
                seq.append(x)
                x += a if k % 2 == 0 else b
        else:
            m = r.randint(1, 4)
            seq = [m * k * (k + 1) // 2 for k in range(1, 7)]
        shown = ", ".join(map(str, seq))
        out.append(r.choice([f"What are the next two numbers in the sequence {shown}, ...? Explain the rule.",
                             f"Find the pattern: {shown}, ... What comes next, and why?"]))
    return out


def _syllogism_puzzles(r: random.Random) -> list[str]:
    out = []
    for premises, conclusion in _SYLLOGISMS:
        for _ in range(4):
            a, b, c = r.sample(_NONSENSE, 3)
            out.append(f"{premises.format(a=a, b=b, c=c)} Does it follow that {conclusion.format(a=a, b=b, c=c)}? "
                       f"Explain why or why not, for example with a diagram described in words.")
    return out


def _calendar_puzzles(r: random.Random) -> list[str]:
    out = []
    for i in range(30):
        day = r.choice(_WEEKDAYS)
        if i % 3 == 0:
            out.append(f"If today is {day}, what day of the week will it be in {r.randint(10, 1000)} days?")
        elif i % 3 == 1:
            h, m, d = r.randint(9, 21), r.choice([0, 10, 15, 30, 45, 50]), r.randint(95, 190)
            out.append(f"A film starts at {h}:{m:02d} and runs for {d} minutes, with a 15-minute interval halfway "
                       f"through. At what time does it end?")
        else:
            out.append(f"The first day of a 31-day month is a {day}. On which weekday does the month end, and how "
                       f"many {r.choice(_WEEKDAYS)}s does the month contain?")
    return out


def _liar_puzzles(r: random.Random) -> list[str]:
    """Three islanders, each a truth-teller or a liar; keep only puzzles with exactly one solution."""
    def claims(speaker: int) -> list[tuple[str, Callable[[tuple[bool, ...]], bool]]]:
        others = [j for j in range(3) if j != speaker]
        out = []
        for j in others:
            out.append((f"{{{j}}} is a liar.", lambda t, j=j: not t[j]))
            out.append((f"{{{j}}} tells the truth.", lambda t, j=j: t[j]))
        a, b = others
        out.append((f"{{{a}}} and {{{b}}} are of the same kind.", lambda t, a=a, b=b: t[a] == t[b]))
        out.append(("At least one of us three is a liar.", lambda t: not all(t)))
        out.append(("Exactly one of us three tells the truth.", lambda t: sum(t) == 1))
        return out

    puzzles: list[str] = []
    while len(puzzles) < 24:
        names = r.sample(_NAMES, 3)
        chosen = [r.choice(claims(s)) for s in range(3)]
        solutions = [t for t in product([True, False], repeat=3)
                     if all(t[s] == test(t) for s, (_, test) in enumerate(chosen))]
        if len(solutions) != 1:
            continue
        said = " ".join(f"{names[s]} says: \"{text.format(*names)}\"" for s, (text, _) in enumerate(chosen))
        puzzles.append(f"On an island, everyone either always tells the truth or always lies. You meet {names[0]}, "
                       f"{names[1]} and {names[2]}. {said} Who tells the truth and who lies? Explain your reasoning.")
    return puzzles


def _reasoning() -> list[str]:
    r = _rng("reasoning")
    return (_order_puzzles(r) + _age_puzzles(r) + _sequence_puzzles(r) + _syllogism_puzzles(r)
            + _calendar_puzzles(r) + _liar_puzzles(r) + _RIDDLES)


# ---------------------------------------------------------------------------------------------------- extraction

_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_SURNAMES = ["Okafor", "Lindqvist", "Haddad", "Moreau", "Tanaka", "Costa", "Novak", "Brennan", "Iyer", "Kowalski",
             "Mendes", "Achterberg", "Sato", "Fischer", "Ruiz", "Mbeki"]


def _date(r: random.Random, months: tuple[int, int] = (1, 12), weekday: bool = False) -> str:
    """A random 2025 date in the given month range, e.g. '14 March 2025' or 'Friday, 14 March 2025'."""
    d = datetime.date(2025, r.randint(*months), r.randint(1, 28))
    text = f"{d.day} {_MONTHS[d.month - 1]} 2025"
    return f"{_WEEKDAYS[d.weekday()]}, {text}" if weekday else text


def _x_job(r: random.Random) -> str:
    company = r.choice(["Brightwell Analytics", "Harbor & Finch", "Kelpie Robotics", "Lumen Grove Studios",
                        "Northgate Logistics", "Quillfeather Press", "Tidewater Health", "Orchard Lane Software"])
    title = r.choice(["backend engineer", "data analyst", "UX designer", "customer success manager",
                      "technical writer", "warehouse supervisor", "marketing coordinator", "QA engineer"])
    city, cur = r.choice([("Leeds", "£"), ("Porto", "€"), ("Austin", "$"), ("Toronto", "CA$"), ("Lyon", "€"),
                          ("Dublin", "€"), ("Melbourne", "A$")])
    lo = r.randint(30, 80) * 1000
    skills = r.sample(["SQL", "Python", "Figma", "Excel", "Kubernetes", "Salesforce", "technical writing",
                       "warehouse management systems", "Google Analytics", "TypeScript", "Tableau", "Jira"], 3)
    mode = r.choice(["fully remote", "hybrid, with two office days a week", "on-site"])
    email = f"jobs@{company.split()[0].lower().replace('&', '')}.example"
    passage = (f"{company} is hiring a {title} to join its team in {city}. The role is {mode}, and the salary "
               f"range is {cur}{lo:,} to {cur}{lo + r.randint(5, 25) * 1000:,} a year. Applicants should have at "
               f"least {r.randint(2, 6)} years of experience with {skills[0]} and {skills[1]}; familiarity with "
               f"{skills[2]} is a plus. Applications close on {_date(r)}. Questions can go to {email}.")
    fields = "company, job_title, city, work_mode, salary_min, salary_max, currency, min_years_experience, " \
             "required_skills (a list), nice_to_have, deadline, contact_email"
    return f"Extract these fields from the job advert below and return them as JSON: {fields}.\n\n{passage}"


def _x_event(r: random.Random) -> str:
    name = r.choice(["Riverside Jazz Evening", "Harvest Food Fair", "Community Repair Café",
                     "Junior Coding Workshop", "Night Market of Local Makers", "Charity Quiz Night",
                     "Spring Plant Swap", "Open Studio Weekend"])
    venue = r.choice(["the Old Corn Exchange", "Fennick Bay Library", "St Aldric's Hall", "the Wharf Warehouse",
                      "Greywater Secondary School", "the botanical garden pavilion"])
    start = r.randint(10, 19)
    price = r.choice(["free", "£5", "£8 (£4 for students)", "€12", "$15 in advance or $20 on the door"])
    person = f"{r.choice(_NAMES)} {r.choice(_SURNAMES)}"
    phone = f"07{r.randint(100, 999)} {r.randint(100000, 999999)}"
    extra = r.choice(["Bring your own cup.", "Dogs on leads are welcome.", "Step-free access is available.",
                      "Places are limited, so please book ahead.", ""])
    passage = (f"Join us for the {name} on {_date(r, weekday=True)}, from {start}:00 to "
               f"{start + r.randint(2, 4)}:30 at {venue}. Entry is {price}. {extra} For questions, contact "
               f"{person} on {phone}.").replace("  ", " ")
    ask = r.choice(["Pull out the event name, date, start and end time, venue, price and contact details as JSON.",
                    "From this announcement, extract the event details into a JSON object with clear field names.",
                    "List the key facts of this event (what, when, where, cost, who to contact) as a YAML mapping."])
    return f"{ask}\n\n{passage}"


def _x_order(r: random.Random) -> str:
    items = r.sample([("USB-C cable", 9.99), ("desk lamp", 34.5), ("notebook (pack of 3)", 12.0),
                      ("ceramic mug", 14.25), ("wireless mouse", 24.99), ("phone case", 17.8),
                      ("yoga mat", 29.0), ("bamboo chopping board", 21.4)], 2)
    qty = [r.randint(1, 4), r.randint(1, 3)]
    ship = r.choice([0.0, 3.99, 4.95, 6.5])
    total = sum(q * p for q, (_, p) in zip(qty, items)) + ship
    order = r.randint(100000, 999999)
    passage = (f"Hi {r.choice(_NAMES)}, thanks for your order #{order} placed on {_date(r, (1, 6))}. You ordered "
               f"{qty[0]} x {items[0][0]} (€{items[0][1]:.2f} each) and {qty[1]} x {items[1][0]} "
               f"(€{items[1][1]:.2f} each). Shipping was €{ship:.2f}, bringing your total to €{total:.2f}. "
               f"Your parcel will be delivered by {r.choice(['DHL', 'a local courier', 'the postal service', 'UPS'])} "
               f"on or before {_date(r, (7, 12))}.")
    return ("Extract the order number, the items (name, quantity, unit price), the shipping cost, the total, the "
            "carrier and the delivery deadline from this email. Answer with JSON only, and check that the total "
            f"is consistent with the items.\n\n{passage}")


def _x_flat(r: random.Random) -> str:
    rooms, floor = r.randint(1, 4), r.choice(["ground", "first", "second", "third", "fifth", "top"])
    area = r.choice(["Brayside", "the old town", "Marrowford centre", "the harbour district", "Tarrow North"])
    rent = r.randint(7, 26) * 50
    feats = r.sample(["a balcony", "a dishwasher", "wooden floors", "a bike store", "a lift", "a small garden",
                      "underfloor heating", "a south-facing living room"], 3)
    pets = r.choice(["Pets are welcome", "No pets, sorry", "Cats considered, no dogs"])
    passage = (f"Bright {rooms}-bedroom flat on the {floor} floor of a {r.choice(['1930s', 'new-build', 'Victorian', '1970s'])} "
               f"building in {area}. {r.randint(35, 120)} m², with {feats[0]}, {feats[1]} and {feats[2]}. Rent is "
               f"£{rent:,} a month plus bills; the deposit is £{rent * r.choice([1, 1.5, 2]):,.0f}. {pets}. "
               f"Available from {_date(r)}. Viewings through {r.choice(_NAMES)} at Keystone Lettings.")
    return ("Turn this rental listing into JSON with the fields bedrooms, floor, size_m2, monthly_rent, deposit, "
            f"pets_allowed, available_from, features and agent.\n\n{passage}")


def _x_meeting(r: random.Random) -> str:
    people = r.sample(_NAMES, 4)
    project = r.choice(["website redesign", "warehouse move", "mobile app launch", "annual report",
                        "customer survey", "office recycling scheme"])
    decisions = r.sample(["postpone the launch by two weeks", "switch to a single weekly status email",
                          "hire a contractor for the design work", "drop the paper version of the survey",
                          "move the budget review to next quarter", "run a small pilot with ten customers"], 2)
    actions = r.sample(["draft the new timeline", "book a room for the workshop", "collect quotes from suppliers",
                        "update the risk log", "write the announcement for staff", "clean up the test data"], 2)
    open_q = r.choice(["Whether legal needs to review the contract", "Who owns the budget after June",
                       "How to handle customers on the old plan"])
    passage = (f"Notes from the {project} meeting on {_date(r, (1, 5))}. Present: {', '.join(people[:3])} and {people[3]}. "
               f"We agreed to {decisions[0]}, and to {decisions[1]}. {people[0]} will {actions[0]} by "
               f"{_date(r, (6, 8))}. {people[1]} is taking care of the task to {actions[1]}, due {_date(r, (6, 9))}. "
               f"{open_q} is still open and will come back at the next meeting.")
    return ("From these meeting notes, extract the attendees, the decisions, the action items (owner, task, due "
            f"date) and any open questions. Return JSON.\n\n{passage}")


def _x_review(r: random.Random) -> str:
    product = r.choice(["robot vacuum", "electric kettle", "running shoes", "budget tablet", "air fryer",
                        "office chair", "bluetooth speaker", "camping stove"])
    pos = r.sample(["It does exactly what it promises.", "It looks great.", "It arrived a day early.",
                    "Customer service replied within a day.", "It feels solid and well made.",
                    "It was good value for money."], 2)
    neg = r.choice(["the instructions are confusing", "it started to show wear after a month",
                    "the packaging was wasteful", "it is heavier than I expected", "it scratches easily"])
    verdict = r.choice(["Overall I'd buy it again.", "I'm returning it.", "It's fine for the price, nothing more.",
                        "I would recommend it to friends."])
    passage = (f"I bought the {product} {r.choice(['two weeks', 'three months', 'a year', 'six weeks'])} ago. "
               f"{pos[0]} {pos[1]} However, {neg}. {verdict}")
    return ("Read this customer review and extract: product, pros (list), cons (list), overall sentiment (positive, "
            f"mixed or negative) and whether the reviewer would recommend it. Reply in JSON.\n\n{passage}")


def _x_flight(r: random.Random) -> str:
    orig, dest = r.sample(["Lisbon (LIS)", "Oslo (OSL)", "Toronto (YYZ)", "Nairobi (NBO)", "Seoul (ICN)",
                           "Madrid (MAD)", "Dublin (DUB)", "Singapore (SIN)"], 2)
    airline = r.choice(["Aurora Air", "Blue Heron Airways", "Meridian Jet", "Coastline Air"])
    code = "".join(r.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(6))
    passage = (f"Your booking {code} is confirmed. Passenger: {r.choice(_NAMES)} {r.choice(_SURNAMES)}. Outbound: "
               f"{airline} flight {code[:2]}{r.randint(100, 999)} from {orig} to {dest}, departing {_date(r, (1, 6))} at "
               f"{r.randint(6, 22):02d}:{r.choice(['05', '20', '35', '50'])}. Return: flight "
               f"{code[:2]}{r.randint(100, 999)} on {_date(r, (7, 12))}, departing {r.randint(6, 22):02d}:15. Baggage: "
               f"{r.choice(['one 23 kg checked bag', 'cabin bag only', 'two checked bags'])}. Seat: "
               f"{r.randint(3, 38)}{r.choice('ABCDEF')}.")
    return ("Extract the booking reference, passenger name, both flights (number, route, date, departure time), "
            f"baggage allowance and seat into a JSON object.\n\n{passage}")


def _extraction() -> list[str]:
    r = _rng("extraction")
    makers = [_x_job, _x_event, _x_order, _x_flat, _x_meeting, _x_review, _x_flight]
    return [make(r) for make in makers for _ in range(30)]


# ------------------------------------------------------------------------------------------------- summarization

# Invented local-news style stories (places and people are fictional). Passages are the first sentence plus an
# ordered subset of the rest, so each story yields several different passages of roughly 110-230 words.
_STORIES: list[list[str]] = [
    [
        "The town council of Marrowford voted on Tuesday to build eleven kilometres of protected bike lanes over the next three years.",
        "Supporters argued that the lanes would make it safer for children to cycle to school, after two collisions near the Eastgate roundabout last spring.",
        "Several shop owners on Mill Street objected, saying that removing forty parking spaces would drive away customers who arrive by car.",
        "A council survey of 1,200 residents found that 58 percent backed the plan, while 31 percent were opposed and the rest had no opinion.",
        "The first section, linking the railway station to the secondary school, is expected to open next September.",
        "Engineers will use low concrete kerbs rather than painted lines, because paint alone has done little to slow traffic elsewhere in the region.",
        "The project will cost about 6.4 million euros, two thirds of which will come from a national grant for sustainable transport.",
        "To address traders' worries, the council promised a short-stay car park behind the library and a review of delivery hours.",
        "Councillor Priya Nandakumar, who proposed the scheme, said the town would publish cycling counts every six months so residents could judge the results.",
    ],
    [
        "A small bakery in the hill village of Castelbrun has started milling its own flour from wheat grown by three nearby farms.",
        "The owners, siblings Ana and Tomás Ferreira, bought a second-hand stone mill last winter after flour prices rose sharply.",
        "They say the fresher flour gives their sourdough a deeper flavour and a darker crust, although it makes the dough less predictable.",
        "Each loaf now costs forty cents more than it did a year ago, but the bakery has not lost its regular customers.",
        "The farms benefit too: they receive a fixed price agreed before planting, which shields them from swings in the grain market.",
        "Milling adds about two hours to the bakers' day, so they have hired a part-time assistant from the village.",
        "On Saturdays the bakery runs a free workshop where children can grind a handful of grain and shape a small roll.",
        "Other bakers in the region have come to see the mill, and two are considering sharing a machine of their own.",
        "The Ferreiras admit the project does not make money yet, but they see it as a way to keep the village's farming tradition alive.",
    ],
    [
        "Researchers at the University of Halvern report that students who slept at least seven hours before an exam recalled more of what they had studied than classmates who stayed up late.",
        "The study followed 240 first-year students over one semester, using wrist trackers to record sleep and short quizzes to measure memory.",
        "Students who slept less than six hours scored on average eleven percentage points lower on recall questions, even when they had studied for longer.",
        "The effect was smaller for questions that required applying a rule than for questions that depended on remembering facts.",
        "The authors caution that the students chose their own sleep schedules, so other habits might explain part of the difference.",
        "Caffeine intake was recorded as well, and heavy coffee drinkers tended to sleep later and less.",
        "The team now plans a controlled experiment in which volunteers will be randomly assigned different bedtimes.",
        "University counsellors said the findings support the advice they already give: a regular routine beats last-minute cramming.",
        "The full results are due to appear in a psychology journal later this year.",
    ],
    [
        "Pellucid Systems, a payroll software firm with 180 employees, has decided to keep the four-day week it has been trialling since January.",
        "During the six-month trial, staff worked 32 hours a week for the same pay, with most teams taking Fridays off.",
        "The company says the number of customer tickets resolved each week stayed roughly the same, while sick days fell by almost a third.",
        "Some managers found scheduling harder, particularly for the support team, which still has to cover five days.",
        "Support staff now work staggered rotas so that someone is always available, and they receive an extra day off each month in return.",
        "In an internal survey, 87 percent of employees said they felt less stressed, although a few reported longer and more intense working days.",
        "Recruiters at the company say job applications have doubled since the trial was announced.",
        "Economists warn that results from a single firm may not carry over to industries where output depends directly on hours worked.",
        "Pellucid will review the arrangement again next year and has promised to share its data with other firms considering the change.",
    ],
    [
        "More than three hundred volunteers spent Sunday morning pulling rubbish out of the Ousel River and off its banks.",
        "The clean-up, now in its fifth year, was organised by a local rowing club together with two primary schools.",
        "Volunteers collected about two tonnes of waste, including shopping trolleys, tyres and hundreds of plastic bottles.",
        "Organisers noticed fewer plastic bags than in previous years, which they put down to the charge on single-use bags introduced in 2021.",
        "A team from the regional water authority tested samples at six points along the river and found that oxygen levels had improved since last summer.",
        "Children from the schools recorded the wildlife they saw, including kingfishers, a family of otters and several kinds of dragonfly.",
        "Local businesses donated gloves, litter pickers and lunch for everyone who took part.",
        "Organisers say the biggest remaining problem is litter washed in from storm drains after heavy rain, which volunteers alone cannot solve.",
        "They are asking the council to fit nets to the three largest drains before next year's event.",
    ],
    [
        "A robotics team from Greywater Secondary School has qualified for the national finals for the first time in the school's history.",
        "The eight students, aged fourteen to seventeen, built a robot that sorts coloured blocks and stacks them on a moving platform.",
        "Their design uses a camera and a small neural network that the students trained themselves on photos taken in the school workshop.",
        "The team nearly withdrew in March when a motor controller burned out two days before the regional round.",
        "A retired electrician who lives near the school helped them repair it, and they went on to finish second out of twenty-two teams.",
        "The team's coach, physics teacher Daniel Okafor, says the students now spend most lunch breaks in the workshop.",
        "The school has launched a fundraising campaign to cover travel and accommodation for the finals, which will cost around 4,000 pounds.",
        "Several students say the competition has changed their plans, and three now hope to study engineering at university.",
        "The finals take place in June, and the winners will represent the country at an international event in the autumn.",
    ],
    [
        "The public library in Fennick Bay has begun lending out tools alongside its usual books and films.",
        "Members can now borrow drills, ladders, sewing machines, a pressure washer and even a tile cutter for up to one week.",
        "The collection started with donations from residents who owned tools they rarely used, and grew with a small grant from the town.",
        "Librarians were trained by a local hardware shop to check each item for safety when it comes back.",
        "In the first two months more than 600 loans were recorded, with the carpet cleaner and the hedge trimmer proving the most popular.",
        "Only three items have been damaged so far, and none has gone missing.",
        "The library also runs monthly repair evenings where volunteers help people fix broken lamps, chairs and small appliances.",
        "Head librarian Marisol Duarte says the aim is to save people money and cut waste, not to compete with local shops.",
        "Fennick Bay's librarians have been invited to describe the scheme at a national conference next spring.",
    ],
    [
        "The Corran Point lighthouse, which has guided ships along a rocky stretch of coast since 1868, is to become a small museum.",
        "The tower was built after a storm wrecked four fishing boats on the nearby reef in a single night.",
        "For almost a century keepers lived in the cottages at its base, trimming the lamp's wicks and winding the clockwork that turned the lens.",
        "The light was automated in 1962, and the last keeper's family moved to the mainland soon afterwards.",
        "Since then the cottages have stood empty, and salt damage has weakened parts of the roof.",
        "A local heritage trust raised the money to buy the site after a five-year campaign that included concerts and a sponsored swim.",
        "The museum will display the original lens, logbooks kept by the keepers and photographs donated by their descendants.",
        "The light itself will keep working, as it still guides small boats along the coast.",
        "The trust hopes to open the museum next spring, with free entry for local schools.",
    ],
    [
        "Biologists surveying a cloud forest in the southern highlands have described a new species of beetle that lives only in the moss on very old trees.",
        "The insect is about four millimetres long, with a metallic green back that looks almost black in the shade.",
        "It was first spotted by a student volunteer who was photographing lichens rather than looking for insects.",
        "Genetic tests showed that its closest relatives live more than 800 kilometres away, suggesting the population has been isolated for a very long time.",
        "The researchers named the species after the village whose residents guided them through the forest.",
        "Because the beetle depends on trees that are several centuries old, it may be threatened by logging and by drier summers.",
        "The team recorded it at only three sites, each smaller than a football pitch.",
        "They recommend adding the area to a nearby protected reserve.",
        "The find adds to a growing list of species recorded in the region over the past decade, many of them tiny and easily overlooked.",
    ],
    [
        "An online grocery service was unavailable for nearly four hours on Thursday evening, its busiest ordering time of the week.",
        "According to the company's incident report, the outage began when a routine database update removed an index that the checkout service relied on.",
        "Without the index, each checkout query took several seconds instead of a few milliseconds, and the database soon ran out of connections.",
        "Engineers first suspected a network fault and spent more than an hour investigating the wrong systems.",
        "The cause was found when an engineer compared the database schema with the previous day's version.",
        "Restoring the index took twenty minutes, but the backlog of queued orders needed another ninety minutes to clear.",
        "Customers whose deliveries were cancelled have been offered a refund and a voucher for their next order.",
        "The company says it will now test schema changes against a copy of real traffic before applying them.",
        "It will also add alerts for slow queries, which it admits should have warned the team much earlier.",
    ],
    [
        "A dispute over a community garden in the Brayside neighbourhood has been settled after months of meetings.",
        "The garden sits on a vacant lot that the city had planned to sell to a developer for a block of flats.",
        "Residents who had grown vegetables there for eight years collected over 2,000 signatures asking the city to keep the space green.",
        "Under the compromise, the developer will build on two thirds of the lot and hand the remaining third to a residents' trust.",
        "The new building must include twelve affordable homes, and its roof will hold beehives and rainwater tanks for the garden.",
        "Some gardeners are unhappy that the plots will shrink, and the waiting list is expected to grow.",
        "The developer has agreed to pay for new raised beds and a tool shed before construction begins.",
        "City officials called the deal a model for other vacant lots, where the need for housing competes with the demand for green space.",
        "Building work is scheduled to start in the autumn, after the last harvest of the season.",
    ],
    [
        "A new exhibition at the Aldermoor City Museum brings together more than ninety maps made between the fifteenth and nineteenth centuries.",
        "Many of the maps show coastlines and rivers that later turned out to be wrong, including an island that never existed.",
        "The curators have built the exhibition around one question: how did mapmakers decide what to include and what to leave out?",
        "One room shows how trade shaped maps, with ports drawn large and inland regions left almost blank.",
        "Another section is devoted to the instruments surveyors used, from simple compasses to brass theodolites.",
        "Visitors can use touch screens to lay the old maps over modern satellite images and see how the land has changed.",
        "Several of the maps have never been shown in public because they were too fragile to move.",
        "Conservators spent a year repairing tears and stabilising the inks, which had begun to eat through the paper.",
        "The exhibition runs until the end of March, and entry is free for visitors under eighteen.",
    ],
    [
        "An amateur astronomer working from her back garden has been credited with the discovery of a new comet.",
        "Retired teacher Helga Sørlie noticed a faint fuzzy spot while taking long-exposure photographs of a star field with a 20-centimetre telescope.",
        "She compared images from three successive nights and saw that the object was moving against the background stars.",
        "Professional observatories confirmed the find within days, and the comet now carries her name.",
        "Astronomers estimate that it takes roughly 4,000 years to orbit the Sun and that it will pass closest to the Sun next spring.",
        "It is unlikely to become visible to the naked eye, but it should be within reach of binoculars from dark locations.",
        "Sørlie has photographed the night sky for fifteen years and has previously reported several variable stars.",
        "She says the discovery shows that careful amateurs can still contribute to science in an age of large automated surveys.",
        "Her local astronomy club is planning a public viewing evening when the comet is at its best.",
    ],
    [
        "Average rents in the city of Tarrow rose by fourteen percent over the past year, the fastest increase since the statistics office began tracking them.",
        "The rise has been steepest for one-bedroom flats near the university and the new hospital campus.",
        "Letting agents say the number of homes available to rent has fallen, as some landlords have sold up or switched to short-term holiday lets.",
        "Young workers and students are hit hardest, with many now spending more than forty percent of their income on housing.",
        "The city council is considering a cap on the number of nights a home can be let to tourists each year.",
        "It has also announced plans to build 900 council homes over the next decade, although critics say this is far too slow.",
        "Landlord associations argue that higher maintenance and energy costs have left them little choice but to raise rents.",
        "Tenant groups want increases for existing tenancies capped at the rate of inflation.",
        "The council will hold a public consultation on its proposals next month before making any decision.",
    ],
    [
        "Marine scientists working off the coast of a small island nation report early success in restoring a coral reef damaged by warm water.",
        "Over three years, divers attached more than 30,000 coral fragments to metal frames placed on the bare sea floor.",
        "The fragments were grown in underwater nurseries from corals that had survived earlier heatwaves, in the hope that they are more resistant.",
        "Surveys show that about seventy percent of the transplanted corals are still alive, and fish numbers over the restored area have tripled.",
        "The project also trains local fishers as divers, giving them a second income during the closed fishing season.",
        "The scientists stress that restoration cannot keep pace with the damage unless ocean warming is slowed.",
        "A single marine heatwave can bleach large areas of reef within weeks, while regrowth takes years.",
        "The team is now testing whether recordings of the sounds of healthy reefs can attract young fish to the restored sites.",
        "Funding runs until the end of next year, and the organisers are looking for partners to extend it.",
    ],
    [
        "Candidates for mayor of Lindholt clashed over water prices in a televised debate on Wednesday night.",
        "Household water bills in the town have risen by a quarter in two years, mainly to pay for replacing pipes laid more than a century ago.",
        "The sitting mayor defended the increases, saying that leaks had been wasting almost a third of the town's treated water.",
        "Her main challenger proposed spreading the cost over a longer period by borrowing, which he said would ease the burden on families.",
        "A third candidate suggested a tiered tariff in which the first few thousand litres each month would be cheap and heavier use would cost more.",
        "All three agreed that the town's reservoir is too small for its growing population, but none offered a detailed plan to enlarge it.",
        "Questions from the audience focused on farmers, who use large volumes of water and fear any tariff based on consumption.",
        "Polls suggest the race is close, with many voters still undecided.",
        "The election will be held on the first Sunday of next month.",
    ],
]
_SUMMARY_STYLES = [
    "Summarise the following passage in two or three sentences.\n\n{p}",
    "Give me a one-sentence summary of this article, then list the three most important facts.\n\n{p}",
    "Write a headline and a 50-word summary for the text below.\n\n{p}",
    "Read the passage and sum it up for a busy executive in three bullet points.\n\n{p}",
    "{p}\n\nTL;DR?",
    "Explain what this news item is about to a ten-year-old, in a short paragraph.\n\n{p}",
    "Condense the passage below into one short paragraph, keeping every number accurate.\n\n{p}",
    "What is the main point of this passage, and what are the two strongest supporting details?\n\n{p}",
    "Here is a local news story:\n\n{p}\n\nSummarise it in under 60 words and note anything that is still undecided.",
]


def _summarization() -> list[str]:
    r = _rng("summarization")
    out = []
    for story in _STORIES:
        passages = [" ".join(story)]
        while len(passages) < 4:
            keep = sorted(r.sample(range(1, len(story)), r.randint(5, 7)))
            text = " ".join([story[0]] + [story[i] for i in keep])
            if text not in passages:
                passages.append(text)
        for p in passages:
            out += [style.format(p=p) for style in r.sample(_SUMMARY_STYLES, 3)]
    return out


# --------------------------------------------------------------------------------------------------- translation

_EN_SENTENCES = [
    "The library will be closed on Monday while the heating system is repaired.",
    "Could you recommend a good place to eat near the train station?",
    "I have been learning the cello for six months, and my neighbours are very patient.",
    "Please remember to water the tomatoes every evening while I am away.",
    "Our flight was delayed by three hours, so we missed the connecting bus.",
    "We need to finish the report by Thursday, otherwise the client will be disappointed.",
    "My brother moved to the coast last year and now goes swimming every morning.",
    "If it snows tomorrow, the school will open two hours later.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "I'm sorry, I didn't catch your name. Could you say it again?",
    "The new park has a playground, a small lake and a café that sells homemade cakes.",
    "She wrote her first novel on the train during her daily commute.",
    "Turn left at the bakery, then take the second street on the right.",
    "The meeting has been moved to the larger conference room on the third floor.",
    "Engineers believe the old bridge can be saved if repairs begin this year.",
    "Would you like to join us for dinner on Saturday? We are making paella.",
    "He left his keys at the office and had to wait for his flatmate to come home.",
    "The festival attracts musicians from all over the world every summer.",
    "Please keep your ticket until the end of the journey.",
    "My grandfather planted this apple tree when my mother was born.",
    "The shop only accepts cash, but there is a cash machine across the street.",
    "We spent the afternoon walking along the river and photographing the old mills.",
    "Can you help me carry these boxes up to the fourth floor?",
    "The forecast says it will be sunny all weekend.",
    "After years of saving, they finally opened their own bookshop.",
    "Do not leave your luggage unattended in the waiting area.",
    "The teacher asked the students to write a short poem about autumn.",
    "I prefer tea in the morning and coffee after lunch.",
    "The hotel room was small but spotless, and the view was wonderful.",
    "Thank you for your help; I couldn't have done it without you.",
    "The concert starts at eight, so let's meet at the entrance at half past seven.",
    "This update fixes several bugs and makes the app start faster.",
    "Our cat sleeps on the windowsill all afternoon and watches the birds.",
    "If you have any questions, don't hesitate to get in touch.",
    "The village is known for its cheese and its Sunday market.",
    "I lost my phone on the bus, but a kind stranger returned it the next day.",
    "It took us four hours to climb to the top, but the view was worth it.",
    "The factory plans to hire fifty new workers next spring.",
    "Children under twelve must be accompanied by an adult.",
    "A: Is this seat free?\nB: Yes, go ahead. Are you going all the way to the last stop?\nA: No, I get off at the university.",
    "Dear Ms Lambert, thank you for your application. We would like to invite you to an interview next Tuesday at "
    "10 a.m. Please let us know whether this time suits you.",
    "Caution: the floor is wet. Please use the handrail and walk slowly.",
    "We are open Monday to Friday from 9 a.m. to 6 p.m. and on Saturday from 10 a.m. to 2 p.m. We are closed on "
    "Sundays and public holidays.",
    "Preheat the oven to 180 degrees. Beat the butter and sugar until pale, then add the eggs one at a time. Fold "
    "in the flour and bake for 25 minutes.",
    "The hiking trail is closed because of a fallen tree. Please take the alternative route along the lake.",
    "I've been thinking about what you said yesterday, and I think you were right. Let's talk again tomorrow.",
    "Happy birthday! I hope this year brings you lots of laughter, good friends and a little adventure.",
    "To reset your password, click the link in the email we have just sent you. The link expires in 24 hours.",
    "The bakery on the corner sells out of croissants by nine o'clock, so go early.",
    "Our team is looking for volunteers to help plant trees in the park next weekend.",
]
_FOREIGN_SENTENCES = {
    "French": [
        "Le marché du samedi ouvre à sept heures, mais les meilleurs fromages partent avant huit heures.",
        "Nous avons raté le dernier train, alors nous avons dormi dans une petite auberge près de la gare.",
        "Pourriez-vous m'indiquer le chemin le plus court pour aller au musée des beaux-arts ?",
        "Ma grand-mère garde toutes ses recettes dans un vieux cahier taché de confiture.",
        "La réunion est reportée à jeudi, car la moitié de l'équipe est malade.",
        "Il pleut depuis trois jours et la rivière commence à déborder dans les champs.",
        "Je cherche un appartement lumineux avec un balcon, pas trop loin du centre.",
        "Le nouveau logiciel est plus rapide, mais son interface déroute les habitués de l'ancienne version.",
        "Après le concert, les musiciens sont restés pour discuter avec le public.",
        "Merci de confirmer votre présence avant la fin de la semaine.",
        "Les enfants ont construit une cabane dans le vieux chêne au fond du jardin.",
        "Ce vin se marie très bien avec un poisson grillé et des légumes de saison.",
    ],
    "German": [
        "Der Bus hatte zwanzig Minuten Verspätung, deshalb habe ich den Anfang des Films verpasst.",
        "Könnten Sie mir bitte sagen, wo ich hier in der Nähe eine Apotheke finde?",
        "Unsere Nachbarn haben im Garten ein kleines Gewächshaus für Tomaten gebaut.",
        "Die Besprechung wurde auf nächsten Dienstag verschoben, weil der Projektleiter krank ist.",
        "Im Winter friert der See so fest zu, dass man darauf Schlittschuh laufen kann.",
        "Ich lerne seit zwei Jahren Gitarre, aber Barréakkorde fallen mir immer noch schwer.",
        "Bitte schalten Sie alle Geräte aus, bevor Sie das Labor verlassen.",
        "Die Bibliothek hat ihre Öffnungszeiten verlängert, damit Studierende abends lernen können.",
        "Mein Großvater erzählt gern Geschichten aus der Zeit, als er zur See fuhr.",
        "Das neue Update schließt mehrere Sicherheitslücken und verlängert die Akkulaufzeit.",
        "Wir sollten früh losfahren, um dem Stau auf der Autobahn zu entgehen.",
        "Der Bäcker an der Ecke verkauft das beste Roggenbrot der ganzen Stadt.",
    ],
    "Spanish": [
        "El tren salió con retraso, así que llegamos a la boda justo cuando empezaba el banquete.",
        "¿Sabes si la farmacia de la esquina abre los domingos por la mañana?",
        "Mi hermana está aprendiendo a programar y ya ha creado su primera página web.",
        "La reunión se cancela porque el cliente no puede viajar esta semana.",
        "En verano, el pueblo se llena de turistas que vienen a ver las fiestas.",
        "Necesito que revises este informe antes de enviarlo a la directora.",
        "Las lluvias de la semana pasada dañaron varias carreteras de la región.",
        "Prefiero cocinar en casa porque así sé exactamente qué ingredientes uso.",
        "El museo ofrece visitas guiadas gratuitas el primer domingo de cada mes.",
        "Olvidé el paraguas en el autobús y tuve que correr bajo la lluvia.",
        "Unos biólogos descubrieron una nueva especie de rana en la selva.",
        "Si terminas los deberes pronto, podemos ir al parque antes de la cena.",
    ],
    "Chinese": [
        "明天早上八点我们在图书馆门口集合，别迟到。",
        "这家小饭馆的饺子特别好吃，每天中午都要排队。",
        "我最近在学做面包，但是总是烤得太硬。",
        "由于天气原因，今天下午的航班全部取消了。",
        "请在周五之前把修改后的报告发给我。",
        "他从小就喜欢画画，现在成了一名插画师。",
        "这个软件更新以后，手机的电池比以前耐用多了。",
        "周末我们打算去山里露营，顺便看看星星。",
        "老师建议我们每天花十分钟读一篇英文短文。",
        "城市里的自行车道越来越多，骑车上班的人也多了起来。",
        "我奶奶虽然八十岁了，但每天早上还去公园打太极拳。",
        "这座石桥已经有三百多年的历史了。",
    ],
}
_TO_STYLES = [
    "Translate into {lang}: {s}",
    "How would I say this in {lang}?\n\n{s}",
    "Please translate the following text into natural {lang}, keeping the tone:\n\n{s}",
    "Translate this into {lang} and briefly explain any word choice that might puzzle a learner:\n\n{s}",
]
_FROM_STYLES = [
    "Translate this {lang} text into English: {s}",
    "What does this mean in English? \"{s}\"",
    "Translate into English, then explain the grammar of the main verb: {s}",
]


def _translation() -> list[str]:
    langs = list(_FOREIGN_SENTENCES)
    out = []
    for i, s in enumerate(_EN_SENTENCES):
        out += [_TO_STYLES[(i + j) % len(_TO_STYLES)].format(lang=lang, s=s) for j, lang in enumerate(langs)]
    for lang, sentences in _FOREIGN_SENTENCES.items():
        for i, s in enumerate(sentences):
            out += [_FROM_STYLES[(i + k) % len(_FROM_STYLES)].format(lang=lang, s=s) for k in range(2)]
    for i, (a, b) in enumerate(permutations(langs, 2)):
        s = _FOREIGN_SENTENCES[a][i % 12]
        out.append(f"Translate this {a} sentence directly into {b}: {s}")
    return out


# -------------------------------------------------------------------------------------------- stem / humanities

_STEM_TOPICS = [
    "the Doppler effect", "entropy and the second law of thermodynamics", "Newton's third law",
    "how a transformer steps voltage up or down", "why the daytime sky looks blue", "the photoelectric effect",
    "terminal velocity", "how lasers produce coherent light", "buoyancy and Archimedes' principle",
    "time dilation in special relativity", "how nuclear fission releases energy",
    "the difference between mass and weight", "how rainbows form", "conservation of angular momentum",
    "how superconductors carry current without resistance", "half-life in radioactive decay",
    "why GPS satellites must correct for relativity", "chemical equilibrium and Le Chatelier's principle",
    "pH and buffer solutions", "covalent versus ionic bonds", "how catalysts speed up reactions",
    "oxidation and reduction", "why ice floats on liquid water", "how rechargeable batteries store energy",
    "isotopes", "the ideal gas law", "how vaccines train the immune system", "photosynthesis",
    "how DNA replication works", "natural selection", "how neurons pass signals to each other",
    "the role of mitochondria in a cell", "how bacteria become resistant to antibiotics", "CRISPR gene editing",
    "the nitrogen cycle", "how enzymes work", "homeostasis", "the difference between viruses and bacteria",
    "how the heart pumps blood around the body", "plate tectonics", "how hurricanes form", "the greenhouse effect",
    "why Earth has seasons", "how black holes form", "the life cycle of a star", "thermohaline ocean circulation",
    "how tides work", "how earthquakes are measured", "why the Pythagorean theorem is true",
    "derivatives as rates of change", "what a definite integral represents",
    "why prime numbers matter for encryption", "the central limit theorem", "Bayes' theorem",
    "eigenvalues and eigenvectors", "complex numbers", "proof by mathematical induction",
    "the difference between correlation and causation", "standard deviation", "logarithms",
    "the Fourier transform", "the Monty Hall problem", "p-values and statistical significance",
    "matrix multiplication", "how a CPU executes instructions", "public-key cryptography",
    "how neural networks learn by gradient descent", "how packets are routed across the internet",
    "error-correcting codes", "how solar panels turn light into electricity", "how a jet engine produces thrust",
    "how bridges spread their loads", "how a refrigerator moves heat", "how lossless compression shrinks files",
    "how touchscreens detect a finger",
]
_STEM_STYLES = [
    "Explain {t} in simple terms, then give one real-world example.",
    "What is {t}? Answer as you would to a first-year university student.",
    "Give a concise but rigorous explanation of {t}, including the key ideas someone should remember.",
    "I keep getting confused about {t}. Can you clear it up with an analogy?",
]

_HUMANITIES_TOPICS = [
    "the causes of the First World War", "the significance of the printing press",
    "the fall of the Western Roman Empire", "the Silk Road and cultural exchange",
    "how the Industrial Revolution changed family life", "the Meiji Restoration",
    "the causes and consequences of the French Revolution", "the space race during the Cold War",
    "the Black Death's impact on European society", "the abolition of the transatlantic slave trade",
    "the Harlem Renaissance", "the decolonisation of Africa after 1945", "the Renaissance in Florence",
    "the Mongol Empire's relay system for messages", "women's suffrage movements", "Plato's allegory of the cave",
    "utilitarianism compared with Kantian ethics", "the trolley problem", "Sartre's existentialism",
    "Stoicism and how people apply it today", "the social contract theories of Hobbes, Locke and Rousseau",
    "Descartes' claim 'I think, therefore I am'", "the problem of free will",
    "Confucian ideas about family and government", "the ship of Theseus paradox", "the themes of Macbeth",
    "symbolism in The Great Gatsby", "why Don Quixote is often called the first modern novel",
    "the role of the chorus in Greek tragedy", "magical realism in Latin American literature",
    "Impressionism in painting", "the Bauhaus movement", "the influence of jazz on twentieth-century music",
    "Gothic architecture", "the hero's journey as a story structure", "unreliable narrators in fiction",
    "the haiku as a poetic form", "supply and demand", "inflation and how central banks respond to it",
    "opportunity cost", "the tragedy of the commons", "confirmation bias", "Maslow's hierarchy of needs",
    "the Sapir-Whorf hypothesis about language and thought", "the social effects of urbanisation",
    "the separation of powers", "federalism", "comparative advantage in international trade",
    "the prisoner's dilemma", "cultural relativism", "the bystander effect",
    "globalisation and local cultures", "how a universal basic income might work", "the Reformation",
    "the Library of Alexandria", "oral storytelling traditions", "the ethics of memory and public monuments",
]
_HUMANITIES_STYLES = [
    "Explain {t} to someone with no background in the subject.",
    "Write a short overview of {t}, then list three questions for further discussion.",
    "What are the main interpretations or arguments concerning {t}? Present more than one perspective.",
    "Summarise {t} in about 200 words, as if for a study guide.",
]


def _stem() -> list[str]:
    return [_STEM_STYLES[(i + k) % 4].format(t=t) for i, t in enumerate(_STEM_TOPICS) for k in range(3)]


def _humanities() -> list[str]:
    return [_HUMANITIES_STYLES[(i + k) % 4].format(t=t) for i, t in enumerate(_HUMANITIES_TOPICS) for k in range(3)]


# ------------------------------------------------------------------------------------------------------------ qa

_PROS_CONS = [
    "renting versus buying a home", "an electric car compared with a hybrid", "working at a start-up",
    "learning the piano as an adult", "index funds", "living in a big city", "standing desks",
    "intermittent fasting", "homeschooling", "buying a refurbished laptop", "solar panels on a house roof",
    "freelancing full time", "taking a gap year", "open-plan offices", "keeping a dog in a flat",
    "cloud storage for family photos", "paying off a mortgage early", "studying abroad",
    "cast-iron pans versus non-stick pans", "audiobooks compared with printed books",
]
_HOW_WORKS = [
    "a credit score", "a heat pump", "noise-cancelling headphones", "a microwave oven", "compound interest",
    "a 3D printer", "a sourdough starter", "wireless phone charging", "an induction hob",
    "a car's anti-lock braking system", "a VPN", "a repayment mortgage", "email spam filtering", "a smoke alarm",
    "an electric guitar pickup", "a dishwasher", "a QR code", "daylight saving time", "a clinical trial",
    "regenerative braking in a hybrid car",
]
_HOW_DO_I = [
    "get rid of fruit flies in my kitchen", "fix a squeaky door hinge", "start running if I have never exercised",
    "make a budget I will actually stick to", "keep basil alive indoors", "remove a red wine stain from a carpet",
    "prepare for a salary negotiation", "improve my handwriting", "back up my phone properly",
    "learn to cook without following recipes", "sleep better on long flights", "write a strong cover letter",
    "unblock a drain without harsh chemicals", "pick a ripe watermelon", "stop putting off big tasks",
    "teach a puppy to walk on a lead", "memorise a speech", "sharpen a kitchen knife",
    "make friends after moving to a new city", "organise a small wardrobe",
]
_QA_FIXED = [
    "Why do onions make people cry, and can I prevent it?", "What is the difference between baking soda and baking powder?",
    "How long should a steak rest after cooking, and why?", "Why does the Moon always show the same face to Earth?",
    "What should I check before buying a second-hand bicycle?", "Is it better to stretch before or after a run?",
    "Why are aeroplane windows rounded?", "What causes hiccups?",
    "How much coffee a day is considered safe for most adults?", "Why do cats purr?",
    "What is the best way to keep fresh herbs from wilting?", "How can I tell whether an egg is still fresh?",
    "Why do leaves change colour in autumn?", "What is the difference between a computer virus and other malware?",
    "Why does bread go stale faster in the fridge?", "What is the difference between an allergy and an intolerance?",
    "How often should I replace my toothbrush?", "Why do we get goosebumps?",
    "How is a leap second different from a leap year?", "What makes a password strong?",
    "Why is the sea salty when most rivers are not?", "What does it mean when a company goes public?",
    "Why do some people feel sick when reading in a moving car?", "How can I judge whether a news story is reliable?",
    "What is the difference between weather and climate?", "Why do tyres have tread patterns?",
    "Do houseplants really improve indoor air quality?", "What should I pack for a three-day hike?",
    "Why do mirrors seem to swap left and right but not up and down?",
    "How does a bill become law in a parliamentary system?", "How can you tell a crocodile from an alligator?",
    "What are the early signs of dehydration?", "Why does it take longer to cook pasta at high altitude?",
    "Why does my recorded voice sound strange to me?", "How long does a plastic bottle take to break down?",
    "What is a good way to explain inflation to a teenager?", "Why do we yawn?",
    "How can I tell a cold from the flu?", "Why do some metals rust while others do not?",
    "How do bees find their way back to the hive?",
]
_QA_SUFFIXES = ["", " Please keep the answer short.", " Explain it as if I were a complete beginner."]


def _qa() -> list[str]:
    out = []
    for i, x in enumerate(_PROS_CONS):
        out += [f"What are the pros and cons of {x}?" + _QA_SUFFIXES[(i + k) % 3] for k in range(3)]
    for i, x in enumerate(_HOW_WORKS):
        out += [f"How does {x} work?" + _QA_SUFFIXES[(i + k) % 3] for k in range(3)]
    for i, x in enumerate(_HOW_DO_I):
        out += [f"How do I {x}?" + _QA_SUFFIXES[(i + k) % 3] for k in range(3)]
    return out + _QA_FIXED


# ------------------------------------------------------------------------------------------------- instructions

_SKILLS = [
    "touch typing", "basic car maintenance", "photo composition", "public speaking", "sourdough baking",
    "personal budgeting", "beginner chess openings", "container gardening", "Spanish pronunciation",
    "basic first aid", "writing clear technical documentation", "home composting", "negotiating a pay rise",
    "time management for students", "watercolour painting", "training for a first 5 km run", "meal prepping",
    "spreadsheet pivot tables", "birdwatching", "sailing knots", "juggling", "bicycle repair",
    "job interview preparation", "mindfulness meditation", "journaling", "calligraphy", "reading faster",
    "starting a podcast", "saving energy at home", "the basics of machine learning", "using git",
    "writing unit tests", "stargazing", "origami", "hosting a dinner party", "electrical safety at home",
    "learning to swim as an adult", "email etiquette", "data visualisation", "the basics of investing",
]
_STEP_TEMPLATES = [
    "Help me get started with {s}. Step 1: explain what a complete beginner needs to know, in three bullet points. "
    "Step 2: list the tools or materials required, with rough costs. Step 3: give me a first exercise I can do "
    "today. Step 4: tell me how I will know I am making progress.",
    "Create a seven-day plan for learning {s}. Give each day a goal, a 20-minute activity and a short self-check "
    "question, and end with a summary table of the week.",
    "About {s}: first list three common beginner mistakes, then explain why each happens, then give a fix for "
    "each, and finally rank them by how much harm they do.",
    "Write a short guide to {s} with these sections in order: Overview (two sentences), Key Terms (five terms "
    "with definitions), Step by Step (a numbered list) and Troubleshooting (three problems with solutions).",
    "I am teaching {s} to a group of teenagers. Please (a) outline a 45-minute lesson, (b) include one hands-on "
    "activity, (c) write three quiz questions with answers, and (d) suggest a homework task.",
    "Compare two different approaches to {s}. Describe each in a paragraph, put their pros and cons in a table, "
    "then recommend one for a busy adult with 15 minutes a day and explain the choice.",
]


def _instructions() -> list[str]:
    n = len(_STEP_TEMPLATES)
    return [_STEP_TEMPLATES[(i + k) % n].format(s=s) for i, s in enumerate(_SKILLS) for k in range(n - 1)]


# ---------------------------------------------------------------------------------------------------- assembly

_BUILDERS: dict[str, Callable[[], list[str]]] = {
    "coding": _coding, "math": _math, "writing": _writing, "roleplay": _roleplay, "reasoning": _reasoning,
    "extraction": _extraction, "summarization": _summarization, "translation": _translation, "stem": _stem,
    "humanities": _humanities, "qa": _qa, "instructions": _instructions,
}
CATEGORIES: tuple[str, ...] = tuple(_BUILDERS)


@functools.lru_cache(maxsize=1)
def _pool() -> dict[str, tuple[str, ...]]:
    """category -> its prompts in build order, each distinct across the whole pool (first occurrence wins)."""
    seen: set[str] = set()
    pool = {}
    for category, build in _BUILDERS.items():
        kept = []
        for text in build():
            text = text.strip()
            if text not in seen:
                seen.add(text)
                kept.append(text)
        pool[category] = tuple(kept)
    return pool


def training_prompts(n: int | None = None, seed: int = 0) -> list[dict]:
    """Held-out training prompts: [{"category": str, "messages": [{"role": "user", "content": str}]}, ...].
    Deterministic for a seed; n=None gives all of them (at least 3,000 distinct prompts), else the first n of a seeded shuffle
    that is interleaved so that any prefix mixes every category roughly evenly.

    Interleaving is proportional: each category's shuffled prompts are spread at even spacing (with a seeded
    phase) over the whole list, so a prefix of any length keeps the full set's category mix - about 30% coding -
    and every category appears within the first 100.
    """
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    rng = random.Random(seed)
    keyed: list[tuple[float, int, str, str]] = []
    for rank, (category, prompts) in enumerate(_pool().items()):
        order = list(prompts)
        rng.shuffle(order)
        phase = rng.random()
        keyed += [((i + phase) / len(order), rank, category, text) for i, text in enumerate(order)]
    keyed.sort(key=lambda k: (k[0], k[1]))
    chosen = keyed if n is None else keyed[:n]
    return [{"category": category, "messages": [{"role": "user", "content": text}]} for _, _, category, text in chosen]
